"""The report's "at a glance" lines name a fastest strategy only where every pairwise comparison
at that worker count is significant, and otherwise say there is no significant difference.

Runs are written into a real MLflow store (tmp) as the launcher tags them, then read back by
``syncbench report``; the expected verdicts come from scipy's exact Mann–Whitney U and a Holm
adjustment written here, and the intervals are checked against bounds that hold for any bootstrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# TTAs (s) by strategy: two sweeps at N=4, five seeds each
SEPARATED = {"sync": [0.50, 0.52, 0.55, 0.57, 0.60],
             "local_sgd": [0.80, 0.82, 0.85, 0.88, 0.90],
             "async": [1.20, 1.25, 1.30, 1.35, 1.40]}
TIED = {"sync": [1.00, 1.20, 1.40, 1.60, 1.80],
        "local_sgd": [1.05, 1.25, 1.45, 1.65, 1.85],
        "async": [1.10, 1.30, 1.50, 1.70, 1.90]}
SEEDS = [0, 1, 2, 3, 4]


def record(workspace: Path, name: str, ttas: dict[str, list[float]], workers: int = 4) -> str:
    """One parent run and one finished evaluation run per strategy x seed, tagged as the
    launcher tags them; returns the tracking URI."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from syncbench.experiments.recording import get_or_create_experiment
    from syncbench.experiments.workspace import artifacts_dir, default_tracking_uri

    workspace.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(workspace)
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, name, artifacts_dir(workspace).as_uri())
    parent = client.create_run(exp, run_name=name, tags={"syncbench.sweep": name, "syncbench.role": "parent"})
    for strategy, values in ttas.items():
        cell = f"strategy.name={strategy},cluster.workers={workers}"
        for seed, tta in zip(SEEDS, values):
            run = client.create_run(exp, run_name=f"{strategy} N={workers} s{seed}", tags={
                "mlflow.parentRunId": parent.info.run_id, "syncbench.sweep": name, "syncbench.role": "trial",
                "syncbench.phase": "eval", "syncbench.cell": cell, "syncbench.seed": str(seed)})
            params = {"strategy.name": strategy, "cluster.workers": str(workers), "seed": str(seed),
                      "budget.train_time_s": "5", "backend": "sim", "eval.every_s": "0.01",
                      "target.metric": "val_acc", "target.value": "0.9", "target.mode": "max"}
            metrics = {"tta_s": tta, "reached": 1.0, "clock_s": tta, "samples": 1000 * tta,
                       "samples_to_target": 1000 * tta, "updates_to_target": 100 * tta}
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                             metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                             tags=[RunTag("outcome", "reached")])
            client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri


def headline(workspace: Path, name: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    from syncbench.analysis.report import write_report
    from syncbench.experiments.workspace import default_tracking_uri

    uri = default_tracking_uri(workspace)
    result = write_report(MlflowClient(uri), name, workspace / "out", tracking_uri=uri, log_to_parent=False)
    md = (workspace / "out" / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("- N=")]
    assert lines, md[:2000]
    return lines, result


def reference_significance(ttas: dict[str, list[float]]) -> dict[tuple[str, str], bool]:
    """(faster, slower) by median -> significant: scipy's exact one-sided U test, Holm over the
    pairs (each direction: the faster-by-median direction is the one that can be significant)."""
    from itertools import combinations

    from scipy.stats import mannwhitneyu

    pairs, pvalues = [], []
    for a, b in combinations(ttas, 2):
        fast, slow = (a, b) if np.median(ttas[a]) <= np.median(ttas[b]) else (b, a)
        pairs.append((fast, slow))
        pvalues.append(mannwhitneyu(ttas[fast], ttas[slow], alternative="less", method="exact").pvalue)
    order = np.argsort(pvalues)
    m, running, adjusted = len(pvalues), 0.0, [0.0] * len(pvalues)
    for rank, i in enumerate(order):  # Holm's step-down, by its definition
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return {pair: adj <= 0.05 for pair, adj in zip(pairs, adjusted)}


def test_strategies_that_tie_get_no_fastest(tmp_path):
    assert not any(reference_significance(TIED).values())  # the reference: nothing significant
    record(tmp_path, "tied", TIED)
    lines, _ = headline(tmp_path, "tied")
    assert len(lines) == 1
    line = lines[0]
    assert "fastest" not in line
    assert "no significant difference" in line
    for ratio in ("local_sgd/sync", "async/sync", "async/local_sgd"):  # every pair, local SGD included
        assert ratio in line


def test_a_significant_difference_names_the_fastest_with_its_interval(tmp_path):
    expected = reference_significance(SEPARATED)
    assert expected == {("sync", "local_sgd"): True, ("sync", "async"): True, ("local_sgd", "async"): True}
    record(tmp_path, "separated", SEPARATED)
    lines, result = headline(tmp_path, "separated")
    line = lines[0]
    assert line.startswith("- N=4: fastest is sync, median TTA 0.55 s"), line
    # each ratio is reported with an interval that must lie within what any resample can give
    for slow in ("local_sgd", "async"):
        a, s = np.array(SEPARATED[slow]), np.array(SEPARATED["sync"])
        text = line.split(f"{slow}/sync ", 1)[1]
        est, low, high = (float(x) for x in text.split("]")[0].replace("[", "").replace(",", "").split())
        assert est == pytest.approx(np.median(a) / np.median(s), rel=5e-3)  # printed to 3 figures
        assert a.min() / s.max() * 0.995 <= low <= est <= high <= a.max() / s.min() * 1.005
        assert low > 1
    assert "Holm p" in line


def test_one_significant_pair_among_ties_names_no_single_fastest(tmp_path):
    ttas = {"sync": SEPARATED["sync"], "local_sgd": [0.51, 0.53, 0.56, 0.58, 0.61], "async": SEPARATED["async"]}
    expected = reference_significance(ttas)
    assert not expected[("sync", "local_sgd")] and expected[("sync", "async")]
    record(tmp_path, "partial", ttas)
    line = headline(tmp_path, "partial")[0][0]
    assert "fastest is" not in line and "no single fastest strategy" in line
    assert "sync faster than async" in line and "local_sgd faster than async" in line


def test_a_claim_refuted_at_one_n_says_another_n_points_the_other_way():
    """Claim (b) refuted at N=4 (async clearly slower) while at N=8 async is faster by its
    median, not significantly: the card says both."""
    from scipy.stats import mannwhitneyu

    from syncbench.analysis.claims import claim_async_faster
    from syncbench.analysis.verdicts import REFUTED, add_caveat
    from tests.test_report_stats import rec, sweep_of

    ttas = {(4, "sync"): [1.0, 1.1, 1.2, 1.3, 1.4], (4, "async"): [2.0, 2.1, 2.2, 2.3, 2.4],
            (8, "sync"): [1.0, 1.3, 1.6, 1.9, 2.2], (8, "async"): [0.9, 1.2, 1.5, 1.8, 2.1]}
    # the reference: N=8 is far from significant either way; N=4 survives Holm over 2 settings
    assert mannwhitneyu(ttas[(8, "async")], ttas[(8, "sync")], alternative="less", method="exact").pvalue > 0.05
    assert 2 * mannwhitneyu(ttas[(4, "async")], ttas[(4, "sync")], alternative="greater",
                            method="exact").pvalue <= 0.05
    runs = [rec(s, n, seed, t, budget=5.0) for (n, s), values in ttas.items() for seed, t in enumerate(values)]
    claim = claim_async_faster(sweep_of(runs))
    assert claim.verdict == REFUTED
    add_caveat(claim)
    assert claim.caveat.startswith("refuted at N=4; the other direction at N=8 (ratio async/sync 0.938 ["), \
        claim.caveat
    assert claim.caveat.endswith("not significant")
