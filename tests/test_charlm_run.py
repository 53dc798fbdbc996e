"""The `charlm` task: its corpus (the standard library's own sources) and an end-to-end run to
its target on the simulated cluster, with and without activation checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from syncbench.experiments.charlm import VOCAB_SIZE, CharData, corpus_files, decode, encode, stdlib_root
from syncbench.experiments.config import load_config

CHARLM = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "charlm.yaml"


def test_corpus_is_split_by_file_and_excludes_tests():
    files = corpus_files(stdlib_root())
    assert files == corpus_files(stdlib_root())  # deterministic
    val = {rel for rel, is_val in files if is_val}
    train = {rel for rel, is_val in files if not is_val}
    assert val and train and not val & train
    assert 0.05 < len(val) / len(files) < 0.15
    for rel in val | train:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"} & set(parts[:-1]), rel
        assert rel.endswith(".py") and not parts[-1].startswith("_sysconfigdata")


def test_vocabulary_round_trips_ascii():
    text = "def f(x):\n\treturn x ~ 1  # ok\n"
    assert decode(encode(text.encode()).tolist()) == text
    assert int(encode("é".encode()).max()) == 0 and VOCAB_SIZE == 98


def test_chardata_windows_and_cache(tmp_path):
    data = CharData(root=str(tmp_path), seq_len=32, max_chars=200_000, val_windows=50)
    data.setup("fit")
    cached = list(tmp_path.glob("charlm-stdlib-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp.npz"))
    x, y = next(iter(data.train_dataloader()))
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (16, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
    assert len(data.val_set) == 50 and len(data.train_set) == (200_000 - 1) // 32
    again = CharData(root=str(tmp_path), seq_len=32, max_chars=200_000, val_windows=50)
    again.setup("fit")  # from the cache: identical windows
    assert torch.equal(again.val_set.tensors[0], data.val_set.tensors[0])


@pytest.mark.heavy
def test_charlm_reaches_its_target_with_and_without_checkpointing(tmp_path):
    """One sim worker, step time pinned so that both runs are evaluated at the same updates:
    checkpointing recomputes, it does not change the optimisation, so both runs reach the
    target after the same number of updates, keeping a fraction of the activation bytes."""
    from syncbench.experiments.run import execute_run

    from syncbench.strategies.checkpointing import release_deepspeed_process_group

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {}
    try:
        for enabled in (False, True):
            # a nearer target than the shipped 1.85: the property (same updates, a fraction of the
            # activation bytes) does not depend on it, and the suite's time does
            config = load_config(CHARLM, ["cluster.workers=1", "strategy.name=sync", "cluster.compute.step_s=0.031",
                                          "target.value=2.3",
                                          f"checkpointing.enabled={str(enabled).lower()}",
                                          f"task.data_args.root={tmp_path / 'data'}"])
            results[enabled] = execute_run(config, workspace=tmp_path, tracking_uri=uri)
    finally:
        release_deepspeed_process_group()  # leave no default process group to later tests
    off, on = results[False], results[True]
    assert off.outcome == on.outcome == "reached"
    assert on.updates_to_target == off.updates_to_target and on.tta_s == pytest.approx(off.tta_s)
    assert on.best_val == pytest.approx(off.best_val, abs=1e-5)
    client = MlflowClient(tracking_uri=uri)
    m_off, m_on = (client.get_run(r.run_id).data for r in (off, on))
    assert m_on.params["checkpointing.enabled"] == "True" and m_off.params["checkpointing.enabled"] == "False"
    assert m_on.tags["outcome"] == "reached"
    assert 0 < m_on.metrics["activation_bytes"] < 0.15 * m_off.metrics["activation_bytes"]


# ---------------------------------------------------------------------------------------
# issue 16: a sweep times each cell's model as its runs train it (checkpointing applied), and
# claim (d) tests the step time on repeated measurements


@pytest.fixture(scope="module")
def checkpointing_sweep(tmp_path_factory):
    """A sweep over batch_size x checkpointing.enabled on charlm (checkpointing of every
    block), one worker, two seeds, a memory limit that fits batch 16 only with
    checkpointing; then a standalone run of the checkpointed batch-16 config."""
    from syncbench.analysis.reader import load_sweep as read_sweep
    from syncbench.experiments.run import execute_run
    from mlflow.tracking import MlflowClient
    from syncbench.strategies.checkpointing import release_deepspeed_process_group
    from syncbench.sweeps.cli import main

    tmp = tmp_path_factory.mktemp("issue16")
    ws = tmp / "ws"
    settings = {"cluster.workers": 1, "strategy.name": "sync", "checkpointing.every": 1,
                "budget.train_time_s": 2.5, "eval.every_s": 0.5, "target.value": 2.95,
                "task.data_args.root": str(tmp / "data"), "task.data_args.max_chars": 400_000,
                "task.data_args.val_windows": 64}
    spec = {"name": "ckpt-spend", "base": str(CHARLM), "set": settings,
            "grid": {"batch_size": [8, 16], "checkpointing.enabled": [False, True]}, "seeds": [0, 1],
            "analysis": {"memory_limit_bytes": 12_000_000}}
    import yaml

    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    try:
        assert main(["sweep", str(tmp / "spec.yaml"), "--workspace", str(ws), "--no-progress"]) == 0
        config = load_config(CHARLM, [f"{k}={v}" for k, v in settings.items()]
                             + ["batch_size=16", "checkpointing.enabled=true"])
        standalone = [execute_run(config, workspace=ws, tracking_uri=uri, experiment="standalone")]
        sweep_step = float(next(r for r in MlflowClient(uri).search_runs(
            [MlflowClient(uri).get_experiment_by_name("ckpt-spend").experiment_id],
            filter_string="params.batch_size = '16' and params.`checkpointing.enabled` = 'True'")
        ).data.params["cluster.compute.step_s"])
        for _ in range(2):  # load from other processes only inflates a calibration: measure again, at most twice
            if min(r.step_time_s for r in standalone) <= 1.10 * sweep_step:
                break
            standalone.append(execute_run(config, workspace=ws, tracking_uri=uri, experiment="standalone"))
    finally:
        release_deepspeed_process_group()  # leave no default process group to later tests
    data = read_sweep(MlflowClient(uri), "ckpt-spend", uri, curves=False)
    return data, standalone, MlflowClient(uri), tmp


@pytest.mark.heavy
@pytest.mark.timing
def test_sweep_calibrates_a_checkpointed_cell_as_a_standalone_run_does(checkpointing_sweep):
    data, standalone, client, _ = checkpointing_sweep
    step = {}
    for r in data.runs:
        assert r.tags["syncbench.step_s_source"] == "sweep" and len(r.step_time_samples) == 8
        step.setdefault((r.batch_size, r.checkpointing), set()).add(float(r.params["cluster.compute.step_s"]))
    assert all(len(v) == 1 for v in step.values())  # pinned per model-changing config, shared by the seeds
    step = {k: v.pop() for k, v in step.items()}
    tags = client.get_run(standalone[-1].run_id).data.tags
    assert tags["syncbench.step_s_source"] == "calibrated" and len(json.loads(tags["syncbench.step_time_samples"])) == 8
    print(f"\nstep_s sweep: {step}; standalone (batch 16, checkpointed): {[r.step_time_s for r in standalone]}")
    # the sweep's value is within 10% of a standalone run's (of up to three: other processes only
    # ever inflate a measurement, and the bug of issue 16 made the sweep's value the plain model's,
    # ~25% below every standalone measurement)
    # Timing on 2 shared cores: contention only ever inflates a measurement (CI once saw the
    # sweep's calibration at 44 ms against 33.5 ms standalone, with batch 8 plain inflated too),
    # so the 10% bound is one-sided -- the bug measured the plain model, ~25% *below* -- and
    # the other side only catches gross errors.
    # CI (2026-12-04, nothing else running) once saw load *during* the three standalone runs: 72 ms
    # each against the sweep's 54 ms a minute earlier (53 ms both, run again). So the lower bound
    # is wide too; the bug itself -- the checkpointed cell timed as the plain model -- is what the
    # direct comparison of the sweep's two batch-16 values below catches.
    best_standalone = min(r.step_time_s for r in standalone)
    assert step[(16, True)] >= 0.70 * best_standalone
    assert step[(16, True)] <= 1.6 * best_standalone
    assert step[(16, True)] > 1.10 * step[(16, False)]  # recomputation costs time: not the plain model's step
    mem = {(r.batch_size, r.checkpointing): r.memory_bytes[1] for r in data.runs}
    assert mem[(16, True)] < 12e6 < mem[(16, False)] and mem[(8, False)] < 12e6


@pytest.mark.heavy
@pytest.mark.timing
def test_claim_d_is_refuted_for_checkpointing_every_block(checkpointing_sweep):
    """The regression of issue 16: the same sweep once reported claim (d) supported with a
    step time of x1 [1, 1] (both cells timed without checkpointing)."""
    from syncbench.analysis.claims import claim_checkpointing

    from syncbench.analysis.report import write_report

    data, _, client, tmp = checkpointing_sweep
    claim = claim_checkpointing(data)
    print("\n" + claim.summary)
    for row in claim.rows:
        print(row.label, row.values, row.verdict, row.note)
    assert claim.verdict == "refuted"
    rows = {r.label: r for r in claim.rows}
    assert set(rows) == {"sync, N=1, batch_size=8", "sync, N=1, batch_size=16"}
    assert rows["sync, N=1, batch_size=16"].verdict == "refuted"  # the configuration
    assert "more than 5% slower" in rows["sync, N=1, batch_size=16"].note
    assert rows["sync, N=1, batch_size=8"].verdict != "supported"
    assert all(r.values["step-time measurements (on/off)"].startswith("8/8") for r in claim.rows)
    report = write_report(client, "ckpt-spend", tmp / "report", tracking_uri=data.tracking_uri, log_to_parent=False)
    (d,) = [c for c in report.claims if c.key == "d"]
    assert d.verdict == "refuted"
    assert "step-time" in {t.key for t in report.threats}
    md = (tmp / "report" / "report.md").read_text()
    assert "Memory spent" in md and "block medians" in md
    assert "checkpointing at batch_size 16 vs without at batch_size 8" in claim.summary


@pytest.mark.heavy
def test_dist_run_trains_and_measures_the_checkpointed_model(tmp_path):
    """Two real processes train charlm with DeepSpeed checkpointing (DeepSpeed joins the run's
    process group after the warm-up), and the run records the checkpointed model's
    activation bytes, probed on the task as prepared for training."""
    from syncbench.experiments.run import execute_run
    from syncbench.experiments.task import build_task, measure_activation_bytes, one_thread
    from syncbench.strategies.checkpointing import release_deepspeed_process_group

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(CHARLM, ["batch_size=8", "checkpointing.enabled=true", "budget.train_time_s=1.0",
                                  "eval.every_s=0.5", "cluster.backend=dist", "cluster.workers=2",
                                  f"task.data_args.root={tmp_path / 'data'}", "task.data_args.max_chars=400000",
                                  "task.data_args.val_windows=64"])
    try:
        result = execute_run(config, workspace=tmp_path, tracking_uri=uri)
    finally:
        release_deepspeed_process_group()
    assert result.outcome in ("budget", "reached") and result.step_time_s > 0
    with one_thread():
        plain = measure_activation_bytes(build_task(config), config)  # the user's module, not checkpointed
    recorded = MlflowClient(tracking_uri=uri).get_run(result.run_id).data.metrics["activation_bytes"]
    assert 0 < recorded < 0.15 * plain
