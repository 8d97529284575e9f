"""What a conversion did, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LayerRecord:
    name: str  # module name in the converted model
    action: str  # e.g. 'bn-folded', 'bn-affine', 'bn-removed', 'separable-exact'
    detail: str = ""
    relative_error: Optional[float] = None  # ||W - W_approx||_F / ||W||_F for low-rank rewrites


@dataclass
class ConversionReport:
    records: list[LayerRecord] = field(default_factory=list)

    def add(self, name: str, action: str, detail: str = "", relative_error: Optional[float] = None) -> None:
        self.records.append(LayerRecord(name, action, detail, relative_error))

    def by_action(self, action: str) -> list[LayerRecord]:
        return [r for r in self.records if r.action == action]

    def __str__(self) -> str:
        lines = [f"{'layer':<36} {'action':<18} {'rel. error':>10}  detail"]
        for r in self.records:
            err = "" if r.relative_error is None else f"{r.relative_error:.3e}"
            lines.append(f"{r.name:<36} {r.action:<18} {err:>10}  {r.detail}")
        return "\n".join(lines)
