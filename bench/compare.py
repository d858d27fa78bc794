"""Current tree against a baseline commit, both measured in the same run, interleaved.

A difference counts as beyond noise only when the two sets of repeated samples do not
overlap at all (every current sample better, or every one worse, than every baseline
sample). With 3 runs a side, chance alone separates them 1 time in 10 (half of that in
the "worse" direction), so a lone separated metric is worth a rerun before a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.common import median
from bench.report import METRICS, Metric, TargetResult

WITHIN = "within noise"
REGRESSION = "REGRESSION"
BETTER = "better"


@dataclass(frozen=True)
class Row:
    metric: Metric
    baseline: list[float]
    current: list[float]

    @property
    def delta_pct(self) -> float | None:
        base, cur = median(self.baseline), median(self.current)
        if base is None or cur is None or base == 0:
            return None
        return (cur - base) / base * 100

    @property
    def verdict(self) -> str:
        if not self.baseline or not self.current:
            return "-"
        if len(self.baseline) < 2 or len(self.current) < 2:
            return "1 sample: no spread"
        if max(min(self.baseline), min(self.current)) <= min(max(self.baseline), max(self.current)):
            return WITHIN
        cur_higher = min(self.current) > max(self.baseline)
        return BETTER if cur_higher == self.metric.higher_is_better else REGRESSION


def spread_pct(values: list[float]) -> float | None:
    """(max - min) / median, in percent: how far repeated runs of one side scatter."""
    med = median(values)
    if len(values) < 2 or not med:
        return None
    return (max(values) - min(values)) / med * 100


def compare(baseline: TargetResult, current: TargetResult) -> list[Row]:
    return [
        Row(m, list(baseline.samples.get(m.key, [])), list(current.samples.get(m.key, [])))
        for m in METRICS
    ]


def _num(value: float | None, metric: Metric) -> str:
    return "-" if value is None else f"{value * metric.scale:,.{metric.digits}f}"


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f} %" if sign else f"{value:.1f} %"


def render_comparison(rows: list[Row], baseline: TargetResult, current: TargetResult) -> str:
    head = ["metric", baseline.label, current.label, "delta", "spread base", "spread cur",
            "verdict"]  # fmt: skip
    table = [head]
    for row in rows:
        m = row.metric
        table.append([
            f"{m.title} ({m.unit})",
            _num(median(row.baseline), m),
            _num(median(row.current), m),
            _pct(row.delta_pct, sign=True),
            _pct(spread_pct(row.baseline)),
            _pct(spread_pct(row.current)),
            row.verdict,
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = []
    for i, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    regressions = [row.metric.title for row in rows if row.verdict == REGRESSION]
    lines.append(
        "medians of the interleaved runs; spread = (max - min) / median of one side; beyond "
        "noise = the two sides' samples do not overlap"
    )
    lines.append(
        f"regression beyond noise: {', '.join(regressions)}"
        if regressions
        else "no regression beyond noise"
    )
    return "\n".join(lines)


def to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            "metric": row.metric.key,
            "baseline": row.baseline,
            "current": row.current,
            "delta_pct": row.delta_pct,
            "spread_pct": {
                "baseline": spread_pct(row.baseline),
                "current": spread_pct(row.current),
            },
            "verdict": row.verdict,
        }
        for row in rows
    ]


__all__ = ["Row", "compare", "render_comparison", "spread_pct", "to_json"]
