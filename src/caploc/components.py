"""Components a mask can ablate: attention heads `L{layer}H{head}` and MLP neurons `L{layer}N{unit}`.

A component is unit `u` of layer `l`; each layout gives every component one flat index `l * per_layer + u`
(the column of an ablation mask). Heads are query heads (GQA models are addressed by their query heads);
a neuron is one input unit of the layer's MLP down projection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from caploc.errors import CaplocError


@dataclass(frozen=True, order=True)
class Component:
    layer: int
    unit: int
    letter: ClassVar[str] = "?"
    noun: ClassVar[str] = "component"

    def __str__(self) -> str:
        return f"L{self.layer}{self.letter}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> "Component":
        match = re.match(rf"^L(\d+){cls.letter}(\d+)$", text.strip(), re.IGNORECASE)
        if not match:
            raise CaplocError(f"not a {cls.noun} name: {text!r} (expected the form L<layer>{cls.letter}<index>, "
                              f"e.g. L3{cls.letter}2)")
        return cls(int(match.group(1)), int(match.group(2)))


@dataclass(frozen=True, order=True, init=False)
class Head(Component):
    letter: ClassVar[str] = "H"
    noun: ClassVar[str] = "head"

    def __init__(self, layer: int, head: int):
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "unit", head)

    @property
    def head(self) -> int:
        """Query-head index within the layer (0-based)."""
        return self.unit


@dataclass(frozen=True, order=True)
class Neuron(Component):
    letter: ClassVar[str] = "N"
    noun: ClassVar[str] = "neuron"


@dataclass(frozen=True)
class Layout:
    """`n_layers` layers of `per_layer` components of type `component`."""

    n_layers: int
    component: ClassVar[type[Component]] = Component

    @property
    def per_layer(self) -> int:
        raise NotImplementedError

    @property
    def n_total(self) -> int:
        return self.n_layers * self.per_layer

    def validate(self, c: Component) -> None:
        if not (0 <= c.layer < self.n_layers and 0 <= c.unit < self.per_layer):
            noun, letter = self.component.noun, self.component.letter
            raise CaplocError(f"{noun} {c} does not exist: this model has layers L0..L{self.n_layers - 1} "
                              f"and {noun}s {letter}0..{letter}{self.per_layer - 1} per layer")

    def index(self, c: Component) -> int:
        self.validate(c)
        return c.layer * self.per_layer + c.unit

    def at(self, index: int) -> Component:
        if not 0 <= index < self.n_total:
            raise CaplocError(f"{self.component.noun} index {index} out of range 0..{self.n_total - 1}")
        return self.component(*divmod(index, self.per_layer))

    def all(self) -> list[Component]:
        return [self.component(l, u) for l in range(self.n_layers) for u in range(self.per_layer)]

    def parse(self, name: str) -> Component:
        c = self.component.parse(name)
        self.validate(c)
        return c

    def parse_list(self, text: str | list[str] | None) -> list[Component]:
        """Parse 'L3H2,L5H1' (or a list of names) into validated components, duplicates dropped;
        'L3' alone means every component of layer 3."""
        if text is None:
            return []
        parts = text.split(",") if isinstance(text, str) else list(text)
        found: list[Component] = []
        for part in (str(p).strip() for p in parts):
            if not part:
                continue
            layer_only = re.match(r"^L(\d+)$", part, re.IGNORECASE)
            if layer_only:
                layer = int(layer_only.group(1))
                self.validate(self.component(layer, 0))
                found.extend(self.component(layer, u) for u in range(self.per_layer))
            else:
                found.append(self.parse(part))
        return list(dict.fromkeys(found))

    def indices(self, text: str | list[str] | None) -> list[int]:
        return [self.index(c) for c in self.parse_list(text)]


@dataclass(frozen=True)
class HeadLayout(Layout):
    """Shape of a model's attention: every query head gets one flat index layer*n_heads + head."""

    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    component: ClassVar[type[Component]] = Head

    @property
    def per_layer(self) -> int:
        return self.n_heads

    def head(self, index: int) -> Head:
        return self.at(index)

    def all_heads(self) -> list[Head]:
        return self.all()

    def kv_group(self, head: Head) -> int:
        """The key/value head that this query head reads under grouped-query attention."""
        self.validate(head)
        return head.head // (self.n_heads // self.n_kv_heads)

    def describe(self) -> dict:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "n_heads_total": self.n_total}


@dataclass(frozen=True)
class NeuronLayout(Layout):
    n_units: int = 0  # MLP intermediate size
    component: ClassVar[type[Component]] = Neuron

    @property
    def per_layer(self) -> int:
        return self.n_units

    def neuron(self, index: int) -> Neuron:
        return self.at(index)
