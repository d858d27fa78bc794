"""Current tree against a baseline commit, both measured in the same run, interleaved.

A difference counts as beyond noise only when the two sets of repeated samples do not
overlap at all (every current sample better, or every one worse, than every baseline
sample). If both sides came from the same distribution, a given order of 2n samples
is as likely as any other, so chance alone puts all n current samples below all n
baseline ones with probability 1 / C(2n, n): 5 % at n = 3, 0.4 % at n = 5. Fewer than
3 samples a side give no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.common import median
from bench.report import METRICS, Metric, TargetResult

MIN_SAMPLES = 3
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
        if len(self.baseline) < MIN_SAMPLES or len(self.current) < MIN_SAMPLES:
            return f"< {MIN_SAMPLES} samples: no verdict"
        if max(min(self.baseline), min(self.current)) <= min(max(self.baseline), max(self.current)):
            return WITHIN
        cur_higher = min(self.current) > max(self.baseline)
        return BETTER if cur_higher == self.metric.higher_is_better else REGRESSION


def false_alarm(n_base: int, n_cur: int) -> float:
    """The chance that noise alone makes every current sample worse than every baseline one."""
    return 1 / math.comb(n_base + n_cur, n_cur)


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
    judged = [row for row in rows if row.verdict in (WITHIN, REGRESSION, BETTER)]
    if judged:
        chance = max(false_alarm(len(r.baseline), len(r.current)) for r in judged)
        lines.append(
            f"noise alone reports a REGRESSION on a metric {chance:.1%} of the time at these "
            "run counts; rerun with more --runs before believing a single one"
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


__all__ = ["Row", "compare", "false_alarm", "render_comparison", "spread_pct", "to_json"]
