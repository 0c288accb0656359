"""Table-1-style comparison tables for the terminal and for markdown.

A table is built from the results dictionary written by :mod:`zootune.experiment` (the same one saved
as ``results.json``): one row per method, one column per target (mean ± std of the test metric over
seeds), the mean over targets, and the cost columns measured by :func:`zootune.cost.measure_cost`
(per-sample training/inference GFLOPs as multiply-accumulates, parameters in millions). Nothing here
types a number by hand: every cell is read from the results.
"""

from __future__ import annotations

import math
from typing import Sequence

_COST_COLUMNS = (
    ("train_gflops", "train GFLOPs"),
    ("train_params", "train params"),
    ("infer_gflops", "infer GFLOPs"),
    ("infer_params", "infer params"),
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def student_t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (probability >= 0.5),
    by bisection on its CDF, F(t) = 1/2 + integral_0^t f(x) dx with the density
    f(x) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + x^2/df)^(-(df+1)/2) integrated by
    Simpson's rule (no SciPy in the core install)."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"need 0.5 <= probability < 1 and df >= 1, got {probability}, {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float, intervals: int = 2000) -> float:
        h = t / intervals
        density = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(intervals + 1)]
        odd, even = sum(density[1:-1:2]), sum(density[2:-1:2])
        return 0.5 + h / 3 * (density[0] + 4 * odd + 2 * even + density[-1])

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval over ``values`` (seeds):
    t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (nan for a single value)."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, student_t_quantile(0.975, len(values) - 1) * std / math.sqrt(len(values))


def format_mean_std(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or std == 0.0 or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_gflops(value: float | None) -> str:
    if value is None:
        return "-"
    # The MiniZoo's models are small: keep enough digits that ratios between methods stay readable.
    return f"{value:.3g}" if value < 1 else f"{value:.2f}"


def format_params(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}K"
    return str(int(value))


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the comparison table of a results dictionary."""
    targets = list(results["targets"])
    metric = results.get("metric", "metric")
    header = ["method", *targets, f"mean {metric}"] + [label for _, label in _COST_COLUMNS]
    rows = []
    for row in results["methods"]:
        cells = [row["label"]]
        for target in targets:
            cell = row["targets"].get(target)
            cells.append(format_mean_std(cell["test_mean"], cell["test_std"]) if cell else "-")
        cells.append(format_mean_std(row.get("mean"), row.get("mean_std")))
        cost = row.get("cost") or {}
        cells += [
            format_gflops(cost.get("train_gflops")),
            format_params(cost.get("train_params")),
            format_gflops(cost.get("infer_gflops")),
            format_params(cost.get("infer_params")),
        ]
        rows.append(cells)
    return header, rows


def format_text_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left_columns: int = 1
) -> str:
    """Columns aligned with spaces: the first ``left_columns`` left-aligned (names), the rest
    right-aligned (numbers)."""
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]

    def line(cells):
        parts = [
            str(cell).ljust(width) if c < left_columns else str(cell).rjust(width)
            for c, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"
    return "\n".join([line(header), align, *(line(r) for r in rows)])


def results_table(results: dict, markdown: bool = False) -> str:
    """The comparison table of a ``zootune run`` results dictionary, as text or markdown."""
    header, rows = table_rows(results)
    return format_markdown_table(header, rows) if markdown else format_text_table(header, rows)
