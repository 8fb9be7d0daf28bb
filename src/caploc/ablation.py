"""Ablation masks applied per row through a component site.

Every row of a batch carries its own vector of per-component multipliers, so one forward pass (or one
`generate()` call, with its KV cache) evaluates many different ablation sets at once:

    x[row, ..., unit] <- scale[row, unit] * x[row, ..., unit] + (1 - scale[row, unit]) * mean[unit]

scale 1 leaves a unit alone, 0 ablates it (to zero, or to its reference mean), >1 enhances it. Hooks are
attached only to layers where some row touches a unit, and only inside `with ablation.applied(...)`, so a
row with no ablation is bit-identical to the unhooked model and nothing is left on the model afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from caploc.errors import CaplocError, ParameterError
from caploc.masks import Masks
from caploc.sites import ComponentSite

ABLATION_MODES = ("zero", "mean")


class ComponentAblation:
    """Per-row scaling of the components of one site (heads or neurons)."""

    def __init__(self, site: ComponentSite, mode: str = "zero"):
        if mode not in ABLATION_MODES:
            raise ParameterError(f"unknown ablation {{mode}} {mode!r}: choose one of {', '.join(ABLATION_MODES)}",
                                 "mode")
        self.site = site
        self.mode = mode
        self.means: torch.Tensor | None = None  # [n_layers, n_units, unit_dim]

    @property
    def n_total(self) -> int:
        return self.site.n_total

    @contextmanager
    def applied(self, masks: Masks | torch.Tensor | None = None, *,
                scales: torch.Tensor | None = None) -> Iterator[None]:
        """Inside the block, row r of every batch is ablated by mask r (`Masks`, or their bool tensor
        [rows, n_total] on the model's device: True ablates), or scaled by `scales[r]` (float [rows, n_total],
        1 = untouched). A single row applies to every row of the batch."""
        if scales is None and masks is not None:
            mask = masks.tensor() if isinstance(masks, Masks) else masks
            scales = (~mask.bool()).to(torch.float64)
        if scales is None:
            yield
            return
        if scales.dim() != 2 or scales.shape[1] != self.n_total:
            raise CaplocError(f"mask must have shape [rows, {self.n_total}], got {tuple(scales.shape)}")
        if self.mode == "mean" and self.means is None and bool((scales.detach() != 1).any()):
            raise CaplocError("mean ablation needs reference means: call fit_means() first")
        per_layer = scales.view(scales.shape[0], self.site.n_layers, self.site.n_units)
        if scales.requires_grad:  # gradients with respect to the multipliers: every layer takes part
            touched = list(range(self.site.n_layers))
        else:
            touched = [l for l, t in enumerate((per_layer != 1).any(dim=(0, 2)).tolist()) if t]
        layer_scales = {l: per_layer[:, l, :] for l in touched}

        def scale_units(layer: int, units: torch.Tensor) -> torch.Tensor:
            s = layer_scales[layer]
            rows = units.shape[0]
            if s.shape[0] != rows:
                if s.shape[0] != 1:
                    raise CaplocError(f"mask has {s.shape[0]} rows but the batch has {rows}")
                s = s.expand(rows, -1)
            s = s.to(device=units.device, dtype=units.dtype)[:, None, :, None]
            out = units * s
            if self.mode == "mean":
                out = out + (1 - s) * self.means[layer].to(device=units.device, dtype=units.dtype)[None, None]
            return out

        with self.site.hooked(scale_units, layers=touched):
            yield

    @torch.no_grad()
    def fit_means(self, run_reference: Callable[[Callable[[torch.Tensor], None]], None]) -> torch.Tensor:
        """Average each unit's input over every real token of a reference set.

        `run_reference(token_weight_setter)` must run the model over the reference prompts; before each
        forward it calls the setter with a [batch, seq] 0/1 tensor marking real (non-padding) tokens.
        """
        sums: list[torch.Tensor | None] = [None] * self.site.n_layers
        count = torch.zeros((), dtype=torch.float64)
        weights: dict = {}

        def capture(layer: int, units: torch.Tensor) -> None:
            x = units.detach().to(torch.float64)
            w = weights["w"].to(x.device, torch.float64)
            summed = (x * w[..., None, None]).sum(dim=(0, 1))
            sums[layer] = summed if sums[layer] is None else sums[layer] + summed

        def set_weights(token_weights: torch.Tensor) -> None:
            nonlocal count
            weights["w"] = token_weights
            count = count + token_weights.sum()

        with self.site.hooked(capture):
            run_reference(set_weights)
        if count == 0:
            raise CaplocError("mean ablation: the reference set has no tokens")
        self.means = torch.stack([(s / count).float() for s in sums])
        return self.means


def component_ablation(model: nn.Module, components: str = "heads", mode: str = "zero") -> ComponentAblation:
    """Ablation of the model's `components` (heads or neurons) in `mode` (zero or mean)."""
    return ComponentAblation(ComponentSite(model, components), mode)
