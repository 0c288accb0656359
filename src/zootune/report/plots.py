"""Plots of a ``zootune run``: accuracy against inference and training cost, and Zoo-Tuning's gates.

matplotlib is an optional extra (``zootune[plot]``); without it the plots are skipped and
:func:`write_plots` says so instead of failing the run. The Agg backend is used so that no display
is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    # savefig to a temporary name, then rename: a reader never sees a half-written image.
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


# Marker shapes cycled together with the colours, so that every method of a run gets its own
# (colour, marker) pair: 10 colours x 7 shapes, never repeated within a plot of fewer than 70 points.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def method_styles(count: int) -> list[tuple[str, str]]:
    """(colour, marker) for ``count`` points, all pairs distinct (for count <= 70)."""
    colours = [f"C{i}" for i in range(10)]
    return [(colours[i % 10], _MARKERS[(i // 10 + i) % len(_MARKERS)]) for i in range(count)]


def overlap_shifts(points: Sequence[tuple[float, float]], gap: float = 0.03, step: float = 7.0) -> list[float]:
    """Horizontal shift (screen points) per point so that markers which would cover each other sit
    side by side: points at the same x (relative 1e-6) whose y differ by less than ``gap`` of the y
    range are shifted by 0, +step, -step, +2 step, ... in the order given."""
    ys = [y for _, y in points]
    y_gap = gap * ((max(ys) - min(ys)) or 1.0)
    shifts: list[float] = []
    for i, (x, y) in enumerate(points):
        close = sum(
            1 for j in range(i)
            if abs(points[j][0] - x) <= 1e-6 * max(abs(x), 1e-12) and abs(points[j][1] - y) < y_gap
        )
        shifts.append(step * ((close + 1) // 2) * (1 if close % 2 else -1))
    return shifts


def plot_accuracy_vs_cost(results: dict, cost_key: str, path: Path, xlabel: str) -> Path | None:
    """Scatter of each method's mean test metric over targets against ``cost[cost_key]``.

    Several methods often share one cost (the single fine-tunes, the soup, Lite Zoo-Tuning's
    inference), so their points sit on one vertical line: text labels next to the points would
    overlap. Each method gets its own colour and marker instead, named in a legend beside the axes,
    ordered by the metric (best first) so the legend reads as a ranking.
    """
    points = [
        (row["cost"][cost_key], row["mean"], row["label"])
        for row in results["methods"]
        if row.get("cost") and row["cost"].get(cost_key) is not None and row.get("mean") is not None
    ]
    if not points:
        return None
    higher_is_better = results.get("higher_is_better", True)
    points.sort(key=lambda p: p[1], reverse=higher_is_better)
    plt = _pyplot()
    from matplotlib.transforms import offset_copy

    fig, ax = plt.subplots(figsize=(7.5, 4))
    shifts = overlap_shifts([(x, y) for x, y, _ in points])
    for (x, y, label), (colour, marker), shift in zip(points, method_styles(len(points)), shifts):
        marks = ax.scatter([x], [y], color=colour, marker=marker, s=42, alpha=0.85, edgecolors="black",
                           linewidths=0.4, label=f"{label} ({y:.1f})", zorder=3)
        if shift:
            # Coinciding points are drawn side by side: shifted on screen only (the axes' limits were
            # already set from the exact data by scatter).
            marks.set_offset_transform(offset_copy(ax.transData, fig=fig, x=shift, y=0.0, units="points"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean test {results.get('metric', 'metric')} over targets")
    ax.grid(True, alpha=0.3)
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")  # e.g. a hub's ensemble next to single models
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7.5, frameon=False,
              title="method (mean)", title_fontsize=8, borderaxespad=0.0)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_gate_heatmap(
    gates: dict[str, Sequence[float]], member_names: Sequence[str], path: Path, title: str
) -> Path | None:
    """Heatmap of mean gate weights: one row per aggregated layer, one column per zoo member."""
    if not gates:
        return None
    plt = _pyplot()
    layers = list(gates)
    matrix = [[float(v) for v in gates[name]] for name in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(member_names), 1.0 + 0.22 * len(layers)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(member_names)), labels=list(member_names), rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="mean gate weight")
    _save(fig, path)
    plt.close(fig)
    return path


def write_plots(results: dict, out_dir: str | Path, log=print) -> dict[str, str]:
    """Write the run's plots into ``out_dir``; returns {plot name: file name}."""
    if not matplotlib_available():
        log("matplotlib is not installed: plots skipped (pip install 'zootune[plot]')")
        return {}
    out_dir = Path(out_dir)
    written = {}
    for key, name, xlabel in (
        ("infer_gflops", "accuracy_vs_inference_cost.png", "inference GFLOPs per sample (MACs)"),
        ("train_gflops", "accuracy_vs_training_cost.png", "training GFLOPs per sample (MACs, forward)"),
    ):
        if plot_accuracy_vs_cost(results, key, out_dir / name, xlabel):
            written[name.removesuffix(".png")] = name
    members = results.get("zoo", {}).get("names", [])
    for method, per_target in (results.get("gates") or {}).items():
        for target, gates in per_target.items():
            name = f"gates_{method}_{target}.png"
            title = f"{method} on {target}: mean gate weight per layer (validation)"
            if plot_gate_heatmap(gates, members, out_dir / name, title):
                written[name.removesuffix(".png")] = name
    return written
