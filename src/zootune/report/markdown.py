"""``results.md``: the comparison table plus what produced it, readable on GitHub."""

from __future__ import annotations

import json

from zootune.report.table import results_table


def results_markdown(results: dict) -> str:
    metric = results.get("metric", "metric")
    config = results.get("config", {})
    zoo = results.get("zoo", {})
    lines = [
        "# zootune run",
        "",
        f"zootune {results.get('zootune_version', '?')}; targets: {', '.join(results['targets'])}; "
        f"seeds: {', '.join(str(s) for s in results.get('seeds', []))}; "
        f"zoo: {', '.join(zoo.get('names', []))}.",
        "",
        f"Test {metric} (mean ± std over seeds; model selection on validation, test evaluated once "
        "per trained model). Costs are per sample, measured with `zootune.cost.measure_cost`: "
        "GFLOPs are multiply-accumulates (the paper's convention), training GFLOPs = forward of the "
        "training-time model (teachers included), params include frozen teachers.",
        "",
        results_table(results, markdown=True),
        "",
    ]
    if results.get("derived_note"):
        lines += [results["derived_note"], ""]
    if config:
        lines += ["## Configuration", "", "```json"]
        lines += [json.dumps(config, indent=2, sort_keys=True), "```", ""]
    if results.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in results["plots"].items()]
        lines.append("")
    seconds = results.get("seconds")
    if seconds is not None:
        lines.append(f"Total time: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"
