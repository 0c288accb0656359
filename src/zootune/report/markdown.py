"""``results.md``: the comparison table plus what produced it, readable on GitHub."""

from __future__ import annotations

import json

from zootune.report.table import format_markdown_table, results_table


def logme_section(results: dict) -> list[str]:
    """Markdown lines: LogME's ranking of the zoo per target next to the fine-tuned ranking, and
    Kendall's tau between them (empty when the run has no LogME results)."""
    logme = results.get("logme") or {}
    per_target = logme.get("targets") or {}
    if not per_target:
        return []
    metric = results.get("metric", "metric")
    higher_is_better = results.get("higher_is_better", True)
    header = ["target", "LogME ranking (best first)", f"fine-tuned test {metric} ranking (best first)",
              "LogME's top = fine-tuned best", "Kendall τ"]
    rows = []
    for target, cell in per_target.items():
        scores, tested = cell.get("scores", {}), cell.get("member_test", {})
        by_logme = sorted(scores, key=scores.get, reverse=True)
        by_test = sorted(tested, key=tested.get, reverse=higher_is_better)
        tau = cell.get("kendall_tau")
        rows.append([
            target,
            ", ".join(f"{name} ({scores[name]:.3f})" for name in by_logme),
            ", ".join(f"{name} ({tested[name]:.2f})" for name in by_test),
            {True: "yes", False: "no"}.get(cell.get("top_match"), "-"),
            "-" if tau is None else f"{tau:.2f}",
        ])
    mean_tau = logme.get("mean_kendall_tau")
    matches = [c.get("top_match") for c in per_target.values() if c.get("top_match") is not None]
    rows.append(["mean", "", "", f"{sum(matches)}/{len(matches)}" if matches else "-",
                 "-" if mean_tau is None else f"{mean_tau:.2f}"])
    return [
        "## LogME ranking vs fine-tuning",
        "",
        "LogME (You et al., ICML 2021) scores each zoo member from its frozen features on the target's "
        "training images, without training. Kendall's τ-b compares that ranking with the members' "
        f"fine-tuned test {metric} (mean over seeds): 1 = same order, 0 = unrelated, −1 = reversed.",
        "",
        format_markdown_table(header, rows),
        "",
    ]


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
    lines += logme_section(results)
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
