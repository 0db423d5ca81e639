"""`FoldReport`: what a folding pass did with every batch normalization."""

from __future__ import annotations

import dataclasses

FOLDED_PRECEDING = "folded_into_preceding"
FOLDED_FOLLOWING = "folded_into_following"
KEPT = "kept_as_scale_shift"
UNCHANGED = "left_unchanged"
ACTIONS = (FOLDED_PRECEDING, FOLDED_FOLLOWING, KEPT, UNCHANGED)


@dataclasses.dataclass(frozen=True)
class FoldRecord:
    """One batch normalization (a Keras layer or an ONNX node or Mul/Add).

    Attributes:
        name: Path of the layer (`"outer/inner/bn"`) or name of the ONNX node.
        action: One of `"folded_into_preceding"`, `"folded_into_following"`,
            `"kept_as_scale_shift"`, `"left_unchanged"` (inside a layer whose
            call cannot be rewritten, e.g. an RNN cell).
        target: Name of the layer or node it was folded into, else `None`.
        reason: Why it was kept (or `""` when folded).
    """

    name: str
    action: str
    target: str | None = None
    reason: str = ""

    @property
    def folded(self) -> bool:
        return self.action in (FOLDED_PRECEDING, FOLDED_FOLLOWING)


@dataclasses.dataclass
class FoldReport:
    """The records of one folding pass, in graph order.

    Example:

    >>> report = FoldReport([FoldRecord("bn", KEPT, reason="feeds two layers")])
    >>> report.num_folded, report.num_kept
    (0, 1)
    """

    records: list[FoldRecord] = dataclasses.field(default_factory=list)

    @property
    def num_folded(self) -> int:
        return sum(r.folded for r in self.records)

    @property
    def num_kept(self) -> int:
        """Batch normalizations not folded (scale-shift or left unchanged)."""
        return len(self.records) - self.num_folded

    @property
    def num_unchanged(self) -> int:
        return sum(r.action == UNCHANGED for r in self.records)

    def by_name(self) -> dict[str, FoldRecord]:
        return {r.name: r for r in self.records}

    def to_markdown(self) -> str:
        lines = ["| batch norm | action | into | reason |", "|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.name} | {r.action} | {r.target or ''} | {r.reason} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"{self.num_folded} folded, {self.num_kept} kept"
        if self.num_unchanged:
            head += f" ({self.num_unchanged} left unchanged)"
        return head + ("\n" + self.to_markdown() if self.records else "")
