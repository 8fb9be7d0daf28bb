"""Component sites: a per-layer component view of a projection's input, where every ablation, enhancement and
capture of components happens (the other hooks caploc puts on a model are in `caploc.hooks`).

A component site is the input of one projection per layer, split into `n_units` components of `unit_dim`
features: attention heads are the slices [h*d:(h+1)*d] of the attention output projection's input (exact
under GQA and whatever the attention kernel), MLP neurons the single inputs of the MLP down projection.
The same view serves
- interventions and captures through forward pre-hooks that exist only inside `with site.hooked(fn):`
  and are removed on every exit path (head/neuron ablation and enhancement, CNL attribution, SAE capture);
- the projection's weight columns of each component (zeroing them is the reference for ablation and the
  way an edited model is exported; their magnitudes give Wanda importance).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from caploc import arch
from caploc.components import Component, Layout
from caploc.errors import ParameterError

COMPONENT_KINDS = ("heads", "neurons")

# fn(layer, units) -> replacement units or None; units is the projection's input viewed as
# [rows, positions, n_units, unit_dim]
HookFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class ComponentSite:
    def __init__(self, model: nn.Module, kind: str = "heads"):
        if kind not in COMPONENT_KINDS:
            raise ParameterError(f"unknown component kind {kind!r} for {{components}}: choose one of "
                                 f"{', '.join(COMPONENT_KINDS)}", "components")
        self.model = model
        self.kind = kind
        self.conv1d = arch.arch_spec(model).conv1d
        if kind == "heads":
            self.layout: Layout = arch.head_layout(model)
            self.modules = arch.attn_out_projs(model)
            self.unit_dim = self.layout.head_dim
        else:
            self.layout = arch.neuron_layout(model)
            self.modules = arch.mlp_down_projs(model)
            self.unit_dim = 1
        self.n_units = self.layout.per_layer

    @property
    def n_layers(self) -> int:
        return len(self.modules)

    @property
    def n_total(self) -> int:
        return self.layout.n_total

    # -- hooks ---------------------------------------------------------------------------------------
    @contextmanager
    def hooked(self, fn: HookFn, layers: Iterable[int] | None = None) -> Iterator["ComponentSite"]:
        """Run `fn` on the projection input of each of `layers` (default: all) for every forward pass inside
        the block; a tensor it returns replaces the input."""
        handles = []
        try:
            for layer in (range(self.n_layers) if layers is None else layers):
                handles.append(self.modules[layer].register_forward_pre_hook(self._pre_hook(fn, layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, fn: HookFn, layer: int):
        def hook(module, args):
            x = args[0]
            out = fn(layer, x.view(*x.shape[:-1], self.n_units, self.unit_dim))
            if out is None:
                return None
            return (out.reshape(x.shape),) + tuple(args[1:])

        return hook

    def hooks_attached(self) -> int:
        """Pre-hooks currently on the site's modules (0 outside every `hooked` block)."""
        return sum(len(m._forward_pre_hooks) for m in self.modules)

    # -- weight columns ------------------------------------------------------------------------------
    def columns(self, layer: int) -> torch.Tensor:
        """The layer's projection weight as a view [out_features, n_units, unit_dim] (writes go to the model)."""
        weight = self.modules[layer].weight
        weight = weight.T if self.conv1d else weight  # GPT-2's Conv1D stores [in, out]
        return weight.view(weight.shape[0], self.n_units, self.unit_dim)

    @torch.no_grad()
    def zero_columns(self, components: Iterable[Component]) -> None:
        """Zero the projection columns of the components in place: the reference ablation and the edit."""
        for c in components:
            self.layout.validate(c)
            self.columns(c.layer)[:, c.unit] = 0

    @torch.no_grad()
    def saved_columns(self, components: Iterable[Component]) -> dict[int, torch.Tensor]:
        """Copies of the weights of the layers the components are in (to restore after an in-place edit)."""
        return {layer: self.modules[layer].weight.detach().clone() for layer in sorted({c.layer for c in components})}

    @torch.no_grad()
    def restore(self, saved: dict[int, torch.Tensor]) -> None:
        for layer, weight in saved.items():
            self.modules[layer].weight.copy_(weight)


def head_site(model: nn.Module) -> ComponentSite:
    return ComponentSite(model, "heads")


def neuron_site(model: nn.Module) -> ComponentSite:
    return ComponentSite(model, "neurons")
