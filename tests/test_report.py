"""Report formatting: tables, results files and plots, checked against plain recomputation."""

from __future__ import annotations

import json
import math
import os
import random
import statistics

import pytest

from zootune.report import (
    atomic_write_json,
    format_markdown_table,
    format_text_table,
    mean_ci95,
    mean_std,
    results_markdown,
    results_table,
    table_rows,
    write_plots,
)
from zootune.report import plots as plots_module


def _results(seed: int = 0) -> dict:
    """A results dictionary shaped like zootune.experiment's, with random numbers."""
    rng = random.Random(seed)
    targets, seeds = ["alpha", "beta"], [0, 1, 2]
    methods = []
    for name, gflops, params in (("finetune [m0]", 0.5, 1.2e6), ("zoo-tuning", 0.55, 6.1e6), ("ensemble", 2.5, 6.0e6)):
        row = {"id": name, "label": name, "method": name, "member": None, "targets": {}}
        for target in targets:
            test = [rng.uniform(40, 90) for _ in seeds]
            row["targets"][target] = {"test": test, "test_mean": statistics.mean(test),
                                      "test_std": statistics.stdev(test), "val": test, "seconds": [1.0] * 3}
        per_seed = [statistics.mean(row["targets"][t]["test"][k] for t in targets) for k in range(3)]
        row["mean"] = statistics.mean(per_seed)
        row["mean_std"] = statistics.stdev(per_seed)
        row["cost"] = {"train_gflops": gflops * (1.1 if name == "zoo-tuning" else 1), "train_params": params,
                       "infer_gflops": gflops, "infer_params": params}
        methods.append(row)
    return {"targets": targets, "seeds": seeds, "metric": "acc", "methods": methods,
            "zoo": {"names": ["m0", "m1", "m2"]}, "zootune_version": "test", "config": {"epochs": 1},
            "gates": {"zoo-tuning": {"alpha": {"conv1": [0.2, 0.5, 0.9], "layer1.0.conv1": [0.6, 0.1, 0.3]}}}}


def test_mean_std_matches_statistics_module():
    rng = random.Random(1)
    for n in (1, 2, 5, 9):
        values = [rng.gauss(0, 10) for _ in range(n)]
        mean, std = mean_std(values)
        assert mean == pytest.approx(statistics.mean(values))
        assert std == pytest.approx(statistics.stdev(values) if n > 1 else 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_student_t_quantiles_match_the_closed_forms_and_the_interval_its_definition():
    from zootune.report.table import student_t_quantile

    for p in (0.6, 0.9, 0.975, 0.995):
        assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-5)  # Cauchy
        assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-5)
    # many degrees of freedom: the normal's quantile, from statistics.NormalDist
    assert student_t_quantile(0.975, 2000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=2e-3)
    assert student_t_quantile(0.975, 4) > student_t_quantile(0.975, 9) > student_t_quantile(0.975, 30)
    try:
        from scipy import stats
    except ImportError:
        pass
    else:
        for df in (3, 4, 9, 30):
            assert student_t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
    values = [1.0, 4.0, 2.0, 8.0]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(3.75)
    assert half == pytest.approx(student_t_quantile(0.975, 3) * statistics.stdev(values) / 2)
    assert math.isnan(mean_ci95([2.0])[1]) and mean_ci95([2.0])[0] == 2.0


def test_text_table_cells_come_from_the_results_and_columns_align():
    results = _results()
    text = results_table(results)
    lines = text.splitlines()
    header, rows = table_rows(results)
    assert len(lines) == 2 + len(results["methods"])
    # every body cell ends at the same character position as its header cell (right-aligned numbers)
    rule = lines[1]
    ends = [i for i in range(len(rule)) if rule[i] == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    assert len(ends) == len(header)
    for line in [lines[0], *lines[2:]]:
        for end in ends[1:]:
            assert line[end] != " ", (line, end)
    for row, line in zip(results["methods"], lines[2:]):
        for target in results["targets"]:
            cell = row["targets"][target]
            assert f"{statistics.mean(cell['test']):.2f} ± {statistics.stdev(cell['test']):.2f}" in line
        assert f"{row['mean']:.2f} ± {row['mean_std']:.2f}" in line
        assert line.startswith(row["label"])
    assert f"{results['methods'][1]['cost']['infer_params'] / 1e6:.2f}M" in lines[3]


def test_markdown_table_has_one_cell_per_column():
    results = _results(3)
    md = results_table(results, markdown=True).splitlines()
    widths = {line.count("|") for line in md}
    assert widths == {len(table_rows(results)[0]) + 1}
    assert md[1].startswith("|:---")
    doc = results_markdown(results)
    assert "\n".join(md) in doc and '"epochs": 1' in doc


def test_generic_tables_escape_and_pad():
    text = format_text_table(["a", "long header"], [["x", "1"], ["yyyy", "22"]]).splitlines()
    assert len({len(line) for line in text}) == 1
    assert format_markdown_table(["a|b", "c"], [["1", "2"]]).splitlines()[0] == "| a\\|b | c |"


def test_atomic_json_writes_nan_as_null_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"x": float("nan"), "y": [1.5, float("inf")], "t": (1, 2)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None], "t": [1, 2]}
    before = path.read_text()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


@pytest.mark.skipif(not plots_module.matplotlib_available(), reason="matplotlib not installed")
def test_plots_are_written_as_png(tmp_path):
    written = write_plots(_results(), tmp_path, log=lambda m: None)
    assert set(written) == {"accuracy_vs_inference_cost", "accuracy_vs_training_cost", "gates_zoo-tuning_alpha"}
    for file in written.values():
        assert (tmp_path / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_skip_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(plots_module, "matplotlib_available", lambda: False)
    notes = []
    assert write_plots(_results(), tmp_path, log=notes.append) == {}
    assert notes and "matplotlib" in notes[0] and not list(tmp_path.iterdir())


def test_markdown_shows_logme_rankings_and_kendall_tau():
    from zootune.analyses import logme_vs_members

    results = _results()
    per_target = {
        "alpha": logme_vs_members({"m0": 0.3, "m1": 0.9, "m2": -0.2}, {"m0": 55.0, "m1": 60.0, "m2": 61.0}),
        "beta": logme_vs_members({"m0": 0.1, "m1": 0.2, "m2": 0.3}, {"m0": 50.0, "m1": 60.0, "m2": 65.0}),
    }
    taus = [per_target[t]["kendall_tau"] for t in ("alpha", "beta")]
    assert taus == [pytest.approx(-1 / 3), pytest.approx(1.0)]
    results["logme"] = {"targets": per_target, "mean_kendall_tau": sum(taus) / 2}
    text = results_markdown(results)
    assert "## LogME ranking vs fine-tuning" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert lines["alpha"].rstrip(" |").endswith(f"{-1 / 3:.2f}")
    assert lines["beta"].rstrip(" |").endswith("1.00")
    assert lines["mean"].rstrip(" |").endswith(f"{(-1 / 3 + 1) / 2:.2f}")
    # Rankings are listed best first: by LogME score, and by fine-tuned accuracy.
    cells = [c.strip() for c in lines["alpha"].split("|")]
    assert cells[2].startswith("m1 (0.900), m0 (0.300), m2 (-0.200)")
    assert cells[3].startswith("m2 (61.00), m1 (60.00), m0 (55.00)")
    assert cells[4] == "no" and lines["beta"].split("|")[4].strip() == "yes"
    assert lines["mean"].split("|")[4].strip() == "1/2"
    # Without LogME results there is no such section.
    assert "LogME" not in results_markdown(_results())


def test_overlap_shifts_separate_only_coinciding_points():
    points = [(1.0, 50.0), (1.0, 50.1), (1.0, 50.05), (1.0, 70.0), (2.0, 50.0)]
    shifts = plots_module.overlap_shifts(points, gap=0.03, step=7.0)
    # The three points within 0.6 (= 3% of the y range 20) at x = 1 are spread 0, +7, -7; the
    # distant point (y 70) and the one at another cost stay where they are.
    assert shifts == [0.0, 7.0, -7.0, 0.0, 0.0]


def test_run_stores_logme_scores_and_tau_against_the_finetuned_members(tmp_path):
    import torch

    from zootune.data.datasets import DatasetSplits, ImageDataset
    from zootune.experiment import RunConfig, run_experiment
    from zootune.methods.logme import logme_score
    from zootune.models import resnet_small
    from zootune.zoo import Zoo

    torch.manual_seed(5)
    zoo = Zoo.from_modules([resnet_small(num_classes=3, depth=10, width=4) for _ in range(3)],
                           names=["z0", "z1", "z2"])

    def target(name, seed=0):
        g = torch.Generator().manual_seed(len(name) + seed)

        def split(n):
            y = torch.arange(n) % 2
            x = torch.randn(n, 3, 16, 16, generator=g) + (2 * y - 1).view(-1, 1, 1, 1)
            return ImageDataset(x, y)

        return DatasetSplits(split(16), split(8), split(8), 2, name)

    config = RunConfig(targets=["t"], seeds=[0], methods=["finetune"], plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=1, eval_batch_size=16))
    results = run_experiment(config, tmp_path, zoo=zoo, load_target=target, echo=None)
    cell = results["logme"]["targets"]["t"]
    # Scores: LogME of each member's pooled features on the training images, computed here directly.
    train = target("t").train
    for member, name in zip(zoo, ["z0", "z1", "z2"]):
        member.eval()
        with torch.no_grad():
            features = member.forward_features(train.images)
        assert cell["scores"][name] == pytest.approx(logme_score(features, train.labels), rel=1e-6)
    # Accuracies: the fine-tuned rows' test metric; tau: the plain pairwise formula on both.
    rows = {row["member"]: row for row in results["methods"] if row["member"]}
    assert cell["member_test"] == {n: pytest.approx(rows[n]["targets"]["t"]["test"][0]) for n in rows}
    names = sorted(rows)
    x = [cell["scores"][n] for n in names]
    y = [cell["member_test"][n] for n in names]
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    signs = [((x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])) for i, j in pairs]
    untied_x, untied_y = sum(a != 0 for a, _ in signs), sum(b != 0 for _, b in signs)
    if untied_x and untied_y:
        expected = sum(a * b for a, b in signs) / math.sqrt(untied_x * untied_y)
        assert cell["kendall_tau"] == pytest.approx(expected)
        assert results["logme"]["mean_kendall_tau"] == pytest.approx(expected)
    else:
        assert cell["kendall_tau"] is None
    assert "Kendall τ" in (tmp_path / "results.md").read_text()
