"""Per-row component ablation by hooks on the input of a projection.

A component is a contiguous slice of a projection's input: an attention head is the slice
[h*d:(h+1)*d] of the output projection's input, an MLP neuron is one input unit of the down projection.
Every row of a batch carries its own vector of per-component multipliers, so one forward pass (or one
`generate()` call, with its KV cache) evaluates many different ablation sets at once:

    x[row, ..., unit] <- scale[row, unit] * x[row, ..., unit] + (1 - scale[row, unit]) * mean[unit]

scale 1 leaves a unit alone, 0 ablates it (to zero, or to its reference mean), >1 enhances it.
Layers whose units are all untouched are skipped, so a row with no ablation is bit-identical to the
unhooked model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import nn

from caploc import arch
from caploc.errors import CaplocError

ABLATION_MODES = ("zero", "mean")


class MaskedProjectionInputs:
    """Hooks `modules` (one per layer); each module's input splits into `n_units` slices of `unit_dim`."""

    def __init__(self, modules: Sequence[nn.Module], n_units: int, unit_dim: int, mode: str = "zero"):
        if mode not in ABLATION_MODES:
            raise CaplocError(f"unknown ablation mode {mode!r}: choose one of {', '.join(ABLATION_MODES)}")
        self.modules = list(modules)
        self.n_units = n_units
        self.unit_dim = unit_dim
        self.mode = mode
        self.means: torch.Tensor | None = None  # [n_layers, n_units, unit_dim]
        self._handles: list = []
        self._layer_scales: list[torch.Tensor | None] = [None] * len(self.modules)

    @property
    def n_total(self) -> int:
        return len(self.modules) * self.n_units

    # -- lifecycle ---------------------------------------------------------------------------------
    def attach(self) -> "MaskedProjectionInputs":
        if not self._handles:
            self._handles = [
                module.register_forward_pre_hook(self._make_hook(layer))
                for layer, module in enumerate(self.modules)
            ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "MaskedProjectionInputs":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- what each row does ------------------------------------------------------------------------
    def clear(self) -> None:
        self._layer_scales = [None] * len(self.modules)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """mask: bool [rows, n_total]; True ablates that component in that row."""
        if mask is None:
            self.clear()
            return
        self.set_scales((~mask.bool()).float())

    def set_scales(self, scales: torch.Tensor) -> None:
        """scales: float [rows, n_total] of per-row, per-component multipliers (1 = untouched)."""
        if scales.dim() != 2 or scales.shape[1] != self.n_total:
            raise CaplocError(f"mask must have shape [rows, {self.n_total}], got {tuple(scales.shape)}")
        if self.mode == "mean" and self.means is None and bool((scales != 1).any()):
            raise CaplocError("mean ablation needs reference means: call fit_means() first")
        per_layer = scales.view(scales.shape[0], len(self.modules), self.n_units)
        touched = (per_layer != 1).any(dim=(0, 2)).tolist()
        self._layer_scales = [per_layer[:, l, :].contiguous() if touched[l] else None for l in range(len(self.modules))]

    @contextmanager
    def rows(self, mask: torch.Tensor | None):
        self.set_mask(mask)
        try:
            yield
        finally:
            self.clear()

    def _make_hook(self, layer: int):
        def hook(module, args):
            scales = self._layer_scales[layer]
            if scales is None:
                return None
            x = args[0]
            rows = x.shape[0]
            if scales.shape[0] != rows:
                if scales.shape[0] != 1:
                    raise CaplocError(f"mask has {scales.shape[0]} rows but the batch has {rows}")
                scales = scales.expand(rows, -1)
            shape = x.shape
            units = x.reshape(rows, -1, self.n_units, self.unit_dim)
            s = scales.to(device=x.device, dtype=x.dtype)[:, None, :, None]
            out = units * s
            if self.mode == "mean":
                mean = self.means[layer].to(device=x.device, dtype=x.dtype)[None, None]
                out = out + (1 - s) * mean
            return (out.reshape(shape),) + tuple(args[1:])

        return hook

    # -- mean ablation -----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_means(self, run_reference: "callable") -> torch.Tensor:
        """Average each unit's input over every real token of a reference set.

        `run_reference(token_weight_setter)` must run the model over the reference prompts; before each
        forward it calls the setter with a [batch, seq] 0/1 tensor marking real (non-padding) tokens.
        """
        sums = [None] * len(self.modules)
        count = torch.zeros((), dtype=torch.float64)
        weights: dict = {}

        def capture(layer):
            def hook(module, args):
                x = args[0].detach().to(torch.float64)
                w = weights["w"].to(x.device, torch.float64)
                summed = (x * w[..., None]).sum(dim=(0, 1))
                sums[layer] = summed if sums[layer] is None else sums[layer] + summed
            return hook

        def set_weights(token_weights: torch.Tensor):
            nonlocal count
            weights["w"] = token_weights
            count = count + token_weights.sum()

        handles = [m.register_forward_pre_hook(capture(l)) for l, m in enumerate(self.modules)]
        saved, self._layer_scales = self._layer_scales, [None] * len(self.modules)
        try:
            run_reference(set_weights)
        finally:
            for h in handles:
                h.remove()
            self._layer_scales = saved
        if count == 0:
            raise CaplocError("mean ablation: the reference set has no tokens")
        self.means = torch.stack([(s / count).float().view(self.n_units, self.unit_dim) for s in sums])
        return self.means


def head_ablation(model: nn.Module, mode: str = "zero") -> MaskedProjectionInputs:
    layout = arch.head_layout(model)
    return MaskedProjectionInputs(arch.attn_out_projs(model), layout.n_heads, layout.head_dim, mode)


def neuron_ablation(model: nn.Module, mode: str = "zero") -> MaskedProjectionInputs:
    """MLP neurons: unit i of a layer is input i of its down projection (unit_dim 1)."""
    from caploc.neurons import neuron_layout

    layout = neuron_layout(model)
    return MaskedProjectionInputs(arch.mlp_down_projs(model), layout.n_units, 1, mode)


COMPONENTS = {"heads": head_ablation, "neurons": neuron_ablation}


def component_ablation(model: nn.Module, components: str = "heads", mode: str = "zero") -> MaskedProjectionInputs:
    if components not in COMPONENTS:
        raise CaplocError(f"unknown component kind {components!r}: choose one of {', '.join(COMPONENTS)}")
    return COMPONENTS[components](model, mode)


def heads_to_mask(head_sets: Iterable[Iterable[int]], n_total: int) -> torch.Tensor:
    """Bool mask [len(head_sets), n_total] from sets of flat head indices."""
    sets = list(head_sets)
    mask = torch.zeros(len(sets), n_total, dtype=torch.bool)
    for row, indices in enumerate(sets):
        idx = list(indices)
        if idx:
            mask[row, idx] = True
    return mask
