"""MLP neurons as components: unit i of layer l is input i of that layer's MLP down projection, `L{l}N{i}`.

Ablating a neuron zeroes (or mean-replaces) that unit with the same per-row masks as heads; it is exactly
zeroing column i of the down projection (the test reference, and how an edited model would be saved).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from caploc import arch
from caploc.errors import CaplocError

_NAME = re.compile(r"^L(\d+)N(\d+)$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Neuron:
    layer: int
    unit: int

    def __str__(self) -> str:
        return f"L{self.layer}N{self.unit}"


@dataclass(frozen=True)
class NeuronLayout:
    n_layers: int
    n_units: int  # MLP intermediate size

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_units

    def index(self, neuron: Neuron) -> int:
        self.validate(neuron)
        return neuron.layer * self.n_units + neuron.unit

    def neuron(self, index: int) -> Neuron:
        if not 0 <= index < self.n_total:
            raise CaplocError(f"neuron index {index} out of range 0..{self.n_total - 1}")
        return Neuron(*divmod(index, self.n_units))

    def validate(self, neuron: Neuron) -> None:
        if not (0 <= neuron.layer < self.n_layers and 0 <= neuron.unit < self.n_units):
            raise CaplocError(f"neuron {neuron} does not exist: this model has layers L0..L{self.n_layers - 1} "
                              f"and neurons N0..N{self.n_units - 1} per layer")

    def parse(self, name: str) -> Neuron:
        match = _NAME.match(name.strip())
        if not match:
            raise CaplocError(f"not a neuron name: {name!r} (expected L<layer>N<unit>, e.g. L3N1024)")
        neuron = Neuron(int(match.group(1)), int(match.group(2)))
        self.validate(neuron)
        return neuron

    def parse_list(self, text: str | list[str] | None) -> list[Neuron]:
        if text is None:
            return []
        parts = text.split(",") if isinstance(text, str) else list(text)
        return [self.parse(p) for p in parts if p.strip()]


def neuron_layout(model: nn.Module) -> NeuronLayout:
    down = arch.mlp_down_projs(model)
    return NeuronLayout(n_layers=len(down), n_units=arch.in_features(down[0], model))
