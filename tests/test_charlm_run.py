"""The `charlm` task: its corpus (the standard library's own sources) and an end-to-end run to
its target on the simulated cluster, with and without activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.charlm import VOCAB_SIZE, CharData, corpus_files, decode, encode, stdlib_root
from experiments.config import load_config

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
    from experiments.run import execute_run

    from strategies.checkpointing import release_deepspeed_process_group

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {}
    try:
        for enabled in (False, True):
            config = load_config(CHARLM, ["cluster.workers=1", "strategy.name=sync", "cluster.compute.step_s=0.031",
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
