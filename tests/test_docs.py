"""The reference ships with the code (docs/), the config reference is generated from the
models and kept current, and the project works outside a clone (`pip install`, `init`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_config_reference_is_current():
    from syncbench.sweeps.reference import REGENERATE, markdown

    assert (DOCS / "config.md").read_text() == markdown(), f"docs/config.md is out of date: run `{REGENERATE}`"


def test_every_config_and_spec_key_is_in_the_reference_with_a_meaning():
    from syncbench.experiments.config import RunConfig, flatten
    from syncbench.sweeps.reference import rows

    for kind in ("run", "sweep"):
        found, undocumented = rows(kind)
        assert not undocumented, (f"{kind}: keys without Field(description=...): {undocumented}; add one and "
                                  f"regenerate docs/config.md")
        assert all(r.type and r.meaning for r in found)
    keys = {r.key for r in rows("run")[0]}
    example = RunConfig.model_validate({"name": "x", "task": {"module": "a:B", "data": "a:C"},
                                        "target": {"metric": "m", "value": 1}, "budget": {"train_time_s": 1},
                                        "eval": {"every_s": 1}, "batch_size": 1})
    for key in flatten(example.model_dump(mode="json")):  # every key a config has is documented
        assert key in keys or key.rsplit(".", 1)[0] in keys, key
    reference = (DOCS / "config.md").read_text()
    assert "`cluster.stragglers.sigma`" in reference and "`tune.params.KEY.choices`" in reference


def test_docs_links_resolve_inside_the_repository():
    pages = [REPO / "README.md", *DOCS.glob("*.md")]
    assert {p.name for p in DOCS.glob("*.md")} >= {"README.md", "config.md", "metrics.md", "strategies.md",
                                                    "backends.md", "adding-a-strategy.md", "scaling-out.md", "ui.md"}
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    readme = (REPO / "README.md").read_text()
    for name in ("config.md", "metrics.md", "strategies.md", "backends.md", "adding-a-strategy.md", "scaling-out.md"):
        assert f"docs/{name}" in readme


def test_help_points_to_docs_in_the_repository_and_version(capsys):
    from syncbench.sweeps.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts += [p.format_help() for p in sub.choices.values()]
    for text in texts:
        assert "DESIGN.md" not in text and "../" not in text
    assert "docs/" in texts[0] and "config.md" in texts[0]
    assert {"run", "sweep", "report", "ui", "dashboard", "config", "init"} <= set(sub.choices)
    done = cli("--version")
    assert done.returncode == 0 and re.fullmatch(r"syncbench \d+\.\d+\S*\n", done.stdout), done


def test_config_command_prints_defaults_and_the_json_schema(tmp_path):
    import json

    import yaml

    done = cli("config", "experiments/configs/digits_mlp.yaml", "--set", "cluster.workers=8")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["cluster"]["workers"] == 8
    schema = json.loads(cli("config", "--schema", "sweep").stdout)
    assert "grid" in schema["properties"]
    bad = cli("config", "experiments/configs/digits_mlp.yaml", "--set", "cluster.nope=1")
    assert bad.returncode == 2 and "cluster.nope" in bad.stderr


@pytest.mark.heavy
def test_init_writes_a_project_that_syncbench_runs_as_written(tmp_path):
    """`syncbench init DIR`, then `syncbench run DIR/run.yaml` from another directory: the
    task module next to the config is found, trains on the sim backend and reaches its target."""
    from syncbench.sweeps.spec import load_sweep

    project = tmp_path / "proj"
    done = cli("init", str(project))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in project.iterdir()) == ["my_task.py", "run.yaml", "sweep.yaml"]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "SYNCBENCH_WORKSPACE": str(tmp_path / "ws"), "PYTHONPATH": str(REPO)}
    done = cli("run", str(project / "run.yaml"), "--no-progress", cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outcome=reached" in done.stdout, done.stdout
    sweep = load_sweep(project / "sweep.yaml")  # the spec is valid as written: 6 cells x 2 seeds
    assert sweep.name == "my-task-sweep" and sweep.total_trials() == 12
    again = cli("init", str(project))
    assert again.returncode == 2 and "already exist" in again.stderr


@pytest.mark.heavy
def test_an_installed_wheel_works_outside_a_clone(tmp_path):
    """Build the wheel, install it into a directory of its own and use it from elsewhere:
    templates, shipped configs, specs and report templates are packaged."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "test-artifacts", "syncbench-runs",
                                                             "__pycache__", "build", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("syncbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("sweeps/templates/my_task.py.tmpl", "sweeps/templates/run.yaml.tmpl",
                   "sweeps/templates/sweep.yaml.tmpl", "experiments/configs/digits_mlp.yaml",
                   "sweeps/specs/demo.yaml", "analysis/report.html.j2", "sweeps/reference.py", "__main__.py"):
        assert f"syncbench/{needed}" in names, needed
    # one import name: nothing else at the top level (benchmarks/ and tests/ are not installed)
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"syncbench"}
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "SYNCBENCH_WORKSPACE": str(tmp_path / "ws")}
    code = "import sys, syncbench.sweeps.cli as c; print(c.__file__); sys.exit(c.main(sys.argv[1:]))"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)

    done = run("init", "proj")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(target))  # the installed copy, not the clone
    assert (elsewhere / "proj" / "my_task.py").is_file()
    done = run("config", "proj/run.yaml")
    assert done.returncode == 0 and "my_task:DigitsClassifier" in done.stdout, done.stderr
    shipped = run("config", "--reference")
    assert shipped.returncode == 0 and shipped.stdout.split("\n", 1)[1] == (DOCS / "config.md").read_text()
    import yaml  # a shipped spec's base resolves inside the installed package (sweeps/spec.py: REPO_ROOT)

    base = yaml.safe_load((target / "syncbench" / "sweeps" / "specs" / "demo.yaml").read_text())["base"]
    assert (target / "syncbench" / base).is_file(), base


def test_mutant_list_in_docs_is_current():
    from benchmarks.mutation_check import MUTANTS, markdown_table

    assert markdown_table(MUTANTS) in (DOCS / "testing.md").read_text(), (
        "docs/testing.md's mutant table is out of date: regenerate it with "
        "`python -m benchmarks.mutation_check --markdown`")
