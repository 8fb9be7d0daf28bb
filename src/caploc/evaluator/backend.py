"""Where an evaluator's mask chunks run: in this process, or sharded over Ray actors (`distributed`).

A backend takes the chunks an `Evaluator` needs ([(groups of request rows, Masks)]) and calls `done(rows,
scores, texts)` on the driver as each chunk finishes, in whatever order; the evaluator stores each chunk's
scores then, so a killed run keeps every finished chunk whatever the backend.
"""

from __future__ import annotations

from typing import Callable, Protocol


class Backend(Protocol):
    size: int  # chunks it runs at once

    def run(self, evaluator, chunks: list, done: Callable) -> None: ...


class InProcess:
    """Every chunk in this process, one after another."""

    size = 1

    def run(self, evaluator, chunks: list, done: Callable) -> None:
        for rows, masks in chunks:
            done(rows, *evaluator.score(masks))

    def describe(self) -> dict:
        return {"backend": "in-process"}


IN_PROCESS = InProcess()
