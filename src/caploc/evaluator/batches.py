"""The padded batch, built in one place: token rows of different lengths -> ids and a real-token mask."""

from __future__ import annotations

import torch


def pad_batch(rows: list[list[int]], pad_id: int | None, side: str = "right", width: int | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, width], real [n, width] with 1 on real tokens). RIGHT padding keeps every real token's
    position and attention exactly as in its unpadded row (causal models never look right), so it is
    the layout for scoring; LEFT padding puts every row's last token in the last column, for generation."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be right or left, got {side!r}")
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id or 0, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[r, cols] = torch.tensor(row, dtype=torch.long)
        real[r, cols] = 1
    if device is not None:
        ids, real = ids.to(device), real.to(device)
    return ids, real
