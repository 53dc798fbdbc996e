"""What a user types: shipped examples by name, where runs are recorded (MLflow's convention:
``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > the workspace; Optuna: ``--storage`` >
``$SYNCBENCH_STORAGE`` > the workspace), and bad input answered with a did-you-mean, in our
words, before torch is imported. Every case is a real ``python -m syncbench`` process, run
from a directory outside the clone. No mocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYDANTIC_WORDING = ("Extra inputs are not permitted", "input_value=", "errors.pydantic.dev", "Value error,",
                    "validation error for")
HEAVY = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "mlflow", "deepspeed", "optuna")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = (),
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m syncbench ARGS`` in ``cwd`` with the workspace ``cwd/ws``; ``env`` is added to a
    copy of this process's environment without the store variables (each test sets the ones it means)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SYNCBENCH_STORAGE")}
    base["SYNCBENCH_WORKSPACE"] = str(cwd / "ws")
    return subprocess.run([sys.executable, *python_flags, "-m", "syncbench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**base, **(env or {})})


def run_id_from(stdout: str) -> str:
    match = re.search(r"MLflow: run ([0-9a-f]{32}) in ", stdout)
    assert match, stdout
    return match.group(1)


def runs_in(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# ------------------------------------------------------------------ shipped examples by name
def test_python_m_syncbench_version(tmp_path):
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and re.fullmatch(r"syncbench \S+\n", done.stdout), done


def test_config_by_name_prints_it_with_its_defaults(tmp_path):
    for arg in ("digits_mlp", "digits_mlp.yaml"):
        done = cli("config", arg, "--set", "cluster.workers=3", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load(done.stdout)
        assert config["name"] == "digits-mlp" and config["cluster"]["workers"] == 3
        assert config["strategy"]["compression"] == "none"  # a default the file does not write
        assert "local_steps" not in config["strategy"]  # an option sync does not read is not shown
    spec = cli("config", "digits_smoke", cwd=tmp_path)  # a shipped spec, validated with every cell
    assert spec.returncode == 0, spec.stderr
    assert yaml.safe_load(spec.stdout)["base"] == "digits_mlp" and "4 cells, 8 trials" in spec.stdout


def test_examples_lists_the_shipped_configs_and_specs_with_a_line_each(tmp_path):
    done = cli("examples", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    for name in ("digits_mlp", "mnist1d_cnn", "demo", "literature", "digits_smoke"):
        assert name in lines, done.stdout
        assert len(lines[name].split()) > 2, lines[name]  # a description follows the name
    shipped = {p.stem for p in (REPO / "experiments" / "configs").glob("*.yaml")}
    shipped |= {p.stem for p in (REPO / "sweeps" / "specs").glob("*.yaml")}
    assert set(lines) == shipped


def test_shipped_specs_name_their_base_config_by_name():
    for spec in (REPO / "sweeps" / "specs").glob("*.yaml"):
        base = yaml.safe_load(spec.read_text())["base"]
        assert (REPO / "experiments" / "configs" / f"{base}.yaml").is_file(), (spec.name, base)


@pytest.mark.parametrize("command,name,listed,guess", [
    ("run", "digits_mpl", "charlm, digits_mlp, fashion_mlp, mnist1d_cnn", "digits_mlp"),
    ("config", "mnist1d", "charlm, digits_mlp, fashion_mlp, mnist1d_cnn", "mnist1d_cnn"),
    ("calibrate", "digit_mlp.yaml", "charlm, digits_mlp, fashion_mlp, mnist1d_cnn", "digits_mlp"),
    ("sweep", "literatur", "demo, digits_smoke, literature", "literature"),
])
def test_an_unknown_name_exits_2_listing_the_shipped_names(tmp_path, command, name, listed, guess):
    done = cli(command, name, cwd=tmp_path)
    assert done.returncode == 2, done
    assert listed in done.stderr and f"did you mean {guess}?" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_spec_given_to_run_says_which_command_takes_it(tmp_path):
    done = cli("run", "literature", cwd=tmp_path)
    assert done.returncode == 2 and "syncbench sweep literature" in done.stderr, done.stderr


# ------------------------------------------------------------------ bad input: fast, in our words
@pytest.mark.parametrize("overrides,says", [
    (["batchsize=3"], "batchsize: unknown key; did you mean batch_size?"),
    (["strategy.name=diloco"], "did you mean local_sgd with outer: {lr: 0.7, momentum: 0.9, nesterov: true}"),
    (["strategy.nmae=sync"], "strategy.nmae: unknown key; did you mean strategy.name?"),
    (["workers=4"], "did you mean cluster.workers?"),
    (["cluster.stragglers={kind: lognormal, sigm: 1}"], "cluster.stragglers.sigm: unknown key; did you mean "
                                                       "cluster.stragglers.sigma?"),
    (["cluster.workers=four"], "cluster.workers"),
    (["strategy.backup_workers=4"], "strategy.backup_workers (4) must be smaller than cluster.workers (4)"),
    (["noequals"], "--set 'noequals': expected KEY=VALUE"),
])
def test_bad_input_names_the_key_with_a_guess_and_imports_no_torch(tmp_path, overrides, says):
    """Answered before torch, Lightning, MLflow or DeepSpeed is imported (the deterministic
    half of a fast answer: benchmarks/first_error.py measures the time)."""
    args = [a for o in overrides for a in ("--set", o)]
    done = cli("run", "digits_mlp", *args, cwd=tmp_path, python_flags=("-X", "importtime"))
    assert done.returncode == 2, done
    messages = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    assert says in messages, messages
    assert not any(w in messages for w in PYDANTIC_WORDING) and "Traceback" not in messages, messages
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "syncbench" in imported  # -X importtime did report the imports
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_a_missing_file_and_a_bad_spec_key_import_no_torch(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": "digits_mlp", "grids": {"cluster.workers": [1]},
                                    "seeds": [0]}))
    for args, says in ((["run", "configs/nope.yaml"], "configs/nope.yaml: no such file"),
                       (["sweep", str(spec)], "grids: unknown key; did you mean grid?")):
        done = cli(*args, cwd=tmp_path, python_flags=("-X", "importtime"))
        assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                    if line.startswith("import time:")}
        assert not imported & set(HEAVY), (args, sorted(imported & set(HEAVY)))


# ------------------------------------------------------------------ where runs are recorded
QUICK = ["--set", "budget.train_time_s=0.3", "--no-progress"]


def test_mlflow_tracking_uri_is_honoured_and_the_run_says_where_it_went(tmp_path):
    env_store = f"sqlite:///{tmp_path / 'env-mlflow.db'}"
    done = cli("run", "digits_mlp", *QUICK, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": env_store})
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = run_id_from(done.stdout)
    assert env_store in done.stdout and "syncbench ui" in done.stdout, done.stdout
    assert [r.info.run_id for r in runs_in(env_store)] == [run_id]
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # not in the workspace


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_tracking_uri_option_wins_over_the_environment(tmp_path):
    env_store, option_store = (f"sqlite:///{tmp_path / name}" for name in ("env.db", "option.db"))
    done = cli("run", "digits_mlp", *QUICK, "--tracking-uri", option_store, cwd=tmp_path,
               env={"MLFLOW_TRACKING_URI": env_store})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.info.run_id for r in runs_in(option_store)] == [run_id_from(done.stdout)]
    assert not (tmp_path / "env.db").exists() and not (tmp_path / "ws" / "mlflow.db").exists()


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_syncbench_storage_is_honoured_by_a_sweep(tmp_path):
    import optuna

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "base": "digits_mlp", "set": {"budget.train_time_s": 0.3},
                                    "grid": {"strategy.name": ["sync"]}, "seeds": [0]}))
    storage, tracking = f"sqlite:///{tmp_path / 'env-optuna.db'}", f"sqlite:///{tmp_path / 'env-mlflow.db'}"
    done = cli("sweep", str(spec), "--no-progress", cwd=tmp_path,
               env={"SYNCBENCH_STORAGE": storage, "MLFLOW_TRACKING_URI": tracking})
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert not (tmp_path / "ws" / "optuna.db").exists() and not (tmp_path / "ws" / "mlflow.db").exists()
    out = " ".join(done.stdout.split())  # the table's last lines may be wrapped
    parent = re.search(r"parent run ([0-9a-f]{32}) in", out)
    assert parent and storage in out and tracking in out, out
    assert parent.group(1) in {r.info.run_id for r in runs_in(tracking)}


def test_store_passwords_are_not_printed():
    from syncbench.experiments.workspace import redact_uri, ui_link

    assert redact_uri("postgresql://me:s3cret@db.example:5432/mlflow") == "postgresql://me:***@db.example:5432/mlflow"
    assert redact_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    link = ui_link("https://me:s3cret@mlflow.example", "r1", "7")
    assert link == "https://me:***@mlflow.example/#/experiments/7/runs/r1"
