"""Reports of a comparison run: the Table-1-style table (terminal, markdown), results.json/md and
plots. The numbers all come from the results dictionary built by :mod:`zootune.experiment`."""

from zootune.report.files import atomic_write_json, atomic_write_text
from zootune.report.markdown import results_markdown
from zootune.report.plots import matplotlib_available, write_plots
from zootune.report.table import (
    format_markdown_table,
    format_mean_std,
    format_text_table,
    mean_ci95,
    mean_std,
    results_table,
    table_rows,
)

__all__ = [
    "atomic_write_json", "atomic_write_text", "format_markdown_table", "format_mean_std",
    "format_text_table", "matplotlib_available", "mean_ci95", "mean_std", "results_markdown", "results_table",
    "table_rows", "write_plots",
]
