"""Training curves from a run's metrics.jsonl, drawn with matplotlib's Agg backend into RUN_DIR/plots/*.png.

Each line of metrics.jsonl is {"step", "epoch", "split": "train" | "val", metric: value...}. Metrics fall into
groups, one figure each and one panel per metric, with a line per split: loss, lr, throughput
(samples_per_s, mfu...), train (other training metrics: grad norm, temperature...) and val (evaluation).
Groups with no metrics are left out.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from rosetta.errors import RosettaError
from rosetta.files import atomic_write

GROUPS = ("loss", "lr", "throughput", "train", "val")
NOT_METRICS = {"step", "epoch", "split"}
SMOOTH_FROM = 20  # points in a training loss curve before a smoothed line is drawn over the raw one


def group_of(metric: str, split: str) -> str:
    if metric == "loss" or metric.endswith("_loss"):
        return "loss"
    if metric == "lr" or metric.startswith("lr_") or metric.endswith("_lr"):
        return "lr"
    if metric == "mfu" or metric.endswith("_per_s"):
        return "throughput"
    return "val" if split == "val" else "train"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a run still writing) is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RosettaError(f"{path}: no such file (is this a run directory?)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RosettaError(f"{path}: cannot read ({e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RosettaError(f"{path}:{number}: not a JSON line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict]) -> dict[str, dict[str, dict[str, list[tuple[float, float]]]]]:
    """group -> metric -> split -> [(step, value)]."""
    series: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in rows:
        step, split = row.get("step"), str(row.get("split", "train"))
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for metric, value in row.items():
            if metric in NOT_METRICS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            series[group_of(metric, split)][metric][split].append((step, value))
    return series


def _smoothed(values: list[float]) -> list[float]:
    """An exponential moving average spanning about a thirtieth of the curve, debiased as TensorBoard's is."""
    weight = 1 - 2 / (max(2.0, len(values) / 30) + 1)
    out, average, seen = [], 0.0, 0
    for value in values:
        if math.isfinite(value):
            average, seen = weight * average + (1 - weight) * value, seen + 1
        out.append(average / (1 - weight**seen) if seen else value)
    return out


def _draw(group: str, metrics: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(5 * columns, 3.5 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax, (metric, splits) in zip(axes, sorted(metrics.items())):
        for split, points in sorted(splits.items()):
            points.sort()
            steps, values = [p[0] for p in points], [p[1] for p in points]
            if group == "loss" and split == "train" and len(points) >= SMOOTH_FROM:
                line, = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
                ax.plot(steps, _smoothed(values), color=line.get_color(), label=f"{split} (smoothed)")
            else:
                ax.plot(steps, values, marker="o" if len(points) < SMOOTH_FROM else None, markersize=3, label=split)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(splits) > 1 or group == "loss":
            ax.legend()
    for ax in axes[len(metrics) :]:  # the grid's unused panels
        ax.set_visible(False)
    figure.suptitle(group)
    atomic_write(path, lambda f: figure.savefig(f, format="png"))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/plots/<group>.png; returns the files written, in GROUPS order."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    series = _series(rows)
    if not series:
        raise RosettaError(f"{run_dir / 'metrics.jsonl'}: no metrics to plot yet")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    paths = []
    for group in GROUPS:
        if group in series:
            path = out / f"{group}.png"
            _draw(group, series[group], path)
            paths.append(path)
    return paths
