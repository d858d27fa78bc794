"""Results of one bench run: the aligned table, the JSON file and the bar chart."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vpnd.files.atomic import PUBLIC, atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"vpnd": "tab:red", "vpnd-base": "tab:orange"}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    scale: float = 1.0
    """Stored value x scale = shown value (pps -> kpps)."""
    digits: int = 0


METRICS = (
    Metric("tcp1", "TCP 1 stream", "Mbit/s", True),
    Metric("tcp4", "TCP 4 streams", "Mbit/s", True),
    Metric("udp64", "UDP 64 B rcvd", "kpps", True, scale=1e-3, digits=1),
    Metric("ping", "ping RTT", "ms", False, digits=3),
    Metric("first_ping", "start->ping", "s", False, digits=2),
)


@dataclass
class TargetResult:
    key: str
    label: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    """metric key -> every run's value (raw units: Mbit/s, pps, ms, s)."""
    errors: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        runs = self.samples.get(metric) or []
        if not runs:
            return None
        ordered = sorted(runs)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(ours: float | None, ref: float | None) -> float | None:
    if ours is None or ref is None or ref == 0:
        return None
    return ours / ref


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_table(results: Sequence[TargetResult], ours: str = "vpnd") -> str:
    """Targets as rows, metrics as columns; then vpnd / each reference."""
    head = ["", *(f"{m.title} ({m.unit})" for m in METRICS)]
    rows = [head]
    for r in results:
        rows.append([r.label, *(_cell(_shown(r.value(m.key), m), m.digits) for m in METRICS)])
    mine = next((r for r in results if r.key == ours), None)
    if mine is not None:
        for r in results:
            if r.key == ours:
                continue
            rows.append(
                [
                    f"{mine.label} / {r.label}",
                    *(_ratio_cell(ratio(mine.value(m.key), r.value(m.key))) for m in METRICS),
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        rest = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or (mine is not None and i == len(results)):
            lines.append("  ".join("-" * w for w in widths))
    lines.append("higher is better for TCP/UDP; lower is better for ping and start->ping")
    errors = [f"{r.label}: {e}" for r in results for e in r.errors]
    lines += [f"error: {e}" for e in errors]
    return "\n".join(lines)


def _shown(value: float | None, metric: Metric) -> float | None:
    return None if value is None else value * metric.scale


def _span(samples: list[float], mid: float) -> tuple[float, float]:
    """How far the lowest and highest sample lie below and above ``mid`` (raw units)."""
    if not samples:
        return 0.0, 0.0
    return max(0.0, mid - min(samples)), max(0.0, max(samples) - mid)


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_json(results: Sequence[TargetResult], settings: dict[str, Any]) -> dict[str, Any]:
    mine = next((r for r in results if r.key == "vpnd"), None)
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "settings": settings,
        "metrics": [asdict(m) for m in METRICS],
        "targets": [
            {
                "key": r.key,
                "label": r.label,
                "median": {m.key: r.value(m.key) for m in METRICS},
                "samples": r.samples,
                "errors": r.errors,
            }
            for r in results
        ],
        "vpnd_ratio": {
            r.key: {m.key: ratio(mine.value(m.key), r.value(m.key)) for m in METRICS}
            for r in results
            if mine is not None and r.key != "vpnd"
        },
    }


def render_png(results: Sequence[TargetResult], path: Path, title: str) -> None:
    """One bar chart per metric, one bar per target; vpnd (and its baseline) highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4.2))
    labels = [r.label for r in results]
    for ax, m in zip(axes, METRICS, strict=True):
        values = [_shown(r.value(m.key), m) or 0.0 for r in results]
        colors = [COLORS.get(r.key, "tab:gray") for r in results]
        # Whiskers: the lowest and highest run, so two close bars show whether they overlap.
        spans = [_span(r.samples.get(m.key) or [], v / m.scale if v else 0.0) for r, v in
                 zip(results, values, strict=True)]  # fmt: skip
        yerr = [[lo * m.scale for lo, _ in spans], [hi * m.scale for _, hi in spans]]
        bars = ax.bar(range(len(results)), values, color=colors, yerr=yerr, capsize=3)
        ax.set_title(
            f"{m.title}\n({m.unit}, {'higher' if m.higher_is_better else 'lower'} is better)"
        )
        ax.set_xticks(range(len(results)), labels, rotation=35, ha="right", fontsize=8)
        for bar, r in zip(bars, results, strict=True):
            v = _shown(r.value(m.key), m)
            ax.annotate(_cell(v, m.digits), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        shown = [v for v in values if v > 0]
        if m.key in ("tcp1", "tcp4") and shown and max(shown) > 10 * min(shown):
            ax.set_yscale("log")  # the bare veth is an order of magnitude above the tunnels
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(
    name: str,
    payload: dict[str, Any],
    results: Sequence[TargetResult] | None,
    title: str,
    out_dir: Path = RESULTS,
) -> list[Path]:
    """``<name>.json`` (+ ``.png``) plus timestamped copies; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    written: list[Path] = []
    data = (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode()
    for stem in (name, f"{name}-{stamp}"):
        path = out_dir / f"{stem}.json"
        atomic_write(path, data, PUBLIC)
        written.append(path)
    if results is not None:
        png = out_dir / f"{name}.png"
        render_png(results, png, title)
        stamped = out_dir / f"{name}-{stamp}.png"
        shutil.copyfile(png, stamped)
        written += [png, stamped]
    return written
