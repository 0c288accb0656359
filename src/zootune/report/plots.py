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


def plot_accuracy_vs_cost(results: dict, cost_key: str, path: Path, xlabel: str) -> Path | None:
    """Scatter of each method's mean test metric over targets against ``cost[cost_key]``."""
    points = [
        (row["cost"][cost_key], row["mean"], row["label"])
        for row in results["methods"]
        if row.get("cost") and row["cost"].get(cost_key) is not None and row.get("mean") is not None
    ]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, label in points:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean test {results.get('metric', 'metric')} over targets")
    ax.grid(True, alpha=0.3)
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
