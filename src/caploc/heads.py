"""Attention heads as components: naming (`L{layer}H{head}`), validation, and the model's head layout."""

from __future__ import annotations

import re
from dataclasses import dataclass

from caploc.errors import CaplocError

_HEAD_RE = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class Head:
    layer: int
    head: int  # query-head index within the layer (0-based)

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, text: str) -> "Head":
        m = _HEAD_RE.match(text.strip())
        if not m:
            raise CaplocError(f"cannot parse head {text!r}: expected the form L<layer>H<head>, e.g. L3H2")
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class HeadLayout:
    """Shape of a model's attention: every query head gets one flat index layer*n_heads + head."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    def index(self, head: Head) -> int:
        self.validate(head)
        return head.layer * self.n_heads + head.head

    def head(self, index: int) -> Head:
        if not 0 <= index < self.n_total:
            raise CaplocError(f"head index {index} out of range 0..{self.n_total - 1}")
        return Head(index // self.n_heads, index % self.n_heads)

    def validate(self, head: Head) -> None:
        if not (0 <= head.layer < self.n_layers and 0 <= head.head < self.n_heads):
            raise CaplocError(
                f"head {head} does not exist: this model has layers L0..L{self.n_layers - 1} "
                f"and heads H0..H{self.n_heads - 1} per layer"
            )

    def kv_group(self, head: Head) -> int:
        """The key/value head that this query head reads under grouped-query attention."""
        self.validate(head)
        return head.head // (self.n_heads // self.n_kv_heads)

    def all_heads(self) -> list[Head]:
        return [Head(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def parse_list(self, text: str | list[str] | None) -> list[Head]:
        """Parse 'L3H2,L5H1' (or a list of names) into validated heads; 'L3' alone means all heads of layer 3."""
        if text is None:
            return []
        parts = text.split(",") if isinstance(text, str) else list(text)
        heads: list[Head] = []
        for part in (p.strip() for p in parts):
            if not part:
                continue
            layer_only = re.match(r"^L(\d+)$", part, re.IGNORECASE)
            if layer_only:
                layer = int(layer_only.group(1))
                if layer >= self.n_layers:
                    self.validate(Head(layer, 0))
                heads.extend(Head(layer, h) for h in range(self.n_heads))
                continue
            head = Head.parse(part)
            self.validate(head)
            heads.append(head)
        return list(dict.fromkeys(heads))

    def describe(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "n_heads_total": self.n_total,
        }
