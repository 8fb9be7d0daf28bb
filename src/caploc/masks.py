"""Ablation masks: the one form a set of ablations takes from a method to the hook.

`Masks` is a bool matrix [n_masks, n_components] (True ablates that component in that mask). Methods build
it (from head sets or random designs), the objective and the evaluator key their records by `key()`, the
store persists under the same key, and the ablation hooks read `tensor()`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from caploc.errors import CaplocError


def mask_key(row: np.ndarray) -> str:
    """The one key of a mask, everywhere (memory, the store): its width and its packed bits in hex."""
    row = np.asarray(row, dtype=bool)
    return f"{row.size}:" + np.packbits(row).tobytes().hex()


class Masks:
    __slots__ = ("rows",)

    def __init__(self, rows: np.ndarray):
        rows = np.ascontiguousarray(rows, dtype=bool)
        if rows.ndim != 2:
            raise CaplocError(f"masks must be [n_masks, n_components], got shape {rows.shape}")
        self.rows = rows

    @classmethod
    def of(cls, masks, n_components: int) -> "Masks":
        """Masks from Masks, a bool array or tensor [n_masks, n_components], or a list of component-index
        collections (one per mask)."""
        if isinstance(masks, Masks):
            out = masks
        elif isinstance(masks, np.ndarray):
            out = cls(masks)
        elif hasattr(masks, "detach"):  # a torch tensor
            out = cls(masks.detach().bool().cpu().numpy())
        else:
            out = cls.from_sets(masks, n_components)
        if out.n_components != n_components:
            raise CaplocError(f"masks must be [n_masks, {n_components}], got {tuple(out.rows.shape)}")
        return out

    @classmethod
    def from_sets(cls, sets: Iterable[Iterable[int]], n_components: int) -> "Masks":
        sets = [sorted({int(i) for i in s}) for s in sets]
        rows = np.zeros((len(sets), n_components), dtype=bool)
        for r, indices in enumerate(sets):
            if indices and (indices[0] < 0 or indices[-1] >= n_components):
                raise CaplocError(f"component index out of range 0..{n_components - 1}: {indices}")
            rows[r, indices] = True
        return cls(rows)

    @classmethod
    def none(cls, n_masks: int, n_components: int) -> "Masks":
        """`n_masks` masks that ablate nothing."""
        return cls(np.zeros((n_masks, n_components), dtype=bool))

    @property
    def n_components(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, which) -> "Masks":
        """A subset of the masks (an index, a slice, a list or a bool selection): always Masks."""
        rows = self.rows[which]
        return Masks(rows[None] if rows.ndim == 1 else rows)

    def key(self, i: int) -> str:
        return mask_key(self.rows[i])

    def keys(self) -> list[str]:
        return [mask_key(row) for row in self.rows]

    def indices(self, i: int) -> list[int]:
        return np.flatnonzero(self.rows[i]).tolist()

    def tensor(self, device=None):
        """The masks as a torch bool tensor (the hooks' form)."""
        import torch

        return torch.from_numpy(self.rows).to(device) if device is not None else torch.from_numpy(self.rows)

    def first_layers(self, per_layer: int, n_layers: int) -> np.ndarray:
        """Per mask, the first layer it touches; the last layer for one that touches none (rows still run one
        layer)."""
        touched = self.rows.reshape(len(self), n_layers, per_layer).any(-1)
        return np.where(touched.any(-1), touched.argmax(-1), n_layers - 1)

    def parting_layers(self, other: np.ndarray, per_layer: int, n_layers: int) -> np.ndarray:
        """Per mask, the first layer where it differs from the mask `other` [n_components]; the last layer for
        one equal to it."""
        differs = (self.rows != other).reshape(len(self), n_layers, per_layer).any(-1)
        return np.where(differs.any(-1), differs.argmax(-1), n_layers - 1)

    def first_layer(self, per_layer: int, n_layers: int) -> int:
        """The first layer any mask touches; the last layer when none does (rows still run one layer)."""
        return int(self.first_layers(per_layer, n_layers).min()) if len(self) else n_layers - 1
