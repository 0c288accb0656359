"""One table and one plot from several ``zootune rl`` runs on the same game (a script, not a test).

The RL comparison of docs/rl.md is run as separate ``zootune rl`` commands on the same game and zoo
(the default methods, the paper variants, ``--finetune-each``), so that the main rows finish first
on a 2-core machine; this merges their ``results.json`` (:func:`zootune.rl.transfer.merge_results`:
rows kept in order, a repeated row taken from the first run) and prints the markdown that
``results.md`` would hold for one run: the methods' area under the curve and final return (mean and
95% t-interval over each row's seeds), the zero-shot returns and the source agents' curves. With
``--plot`` it also draws every row's learning curve.

Usage: python benchmarks/rl_report.py RUN_DIR [RUN_DIR ...] [--plot learning_curves.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zootune.rl.transfer import merge_results, plot_learning_curves, results_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="zootune rl output folders (each with results.json)")
    parser.add_argument("--plot", help="write the merged learning curves here (PNG)")
    args = parser.parse_args()
    merged = merge_results([json.loads((Path(run) / "results.json").read_text()) for run in args.runs])
    merged["plot"] = None
    if args.plot:
        path = plot_learning_curves(merged, Path(args.plot))
        merged["plot"] = path.name if path else None
    print(results_markdown(merged))


if __name__ == "__main__":
    main()
