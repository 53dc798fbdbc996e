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

    done = cli("config", "digits_mlp", "--set", "cluster.workers=8")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["cluster"]["workers"] == 8
    schema = json.loads(cli("config", "--schema", "sweep").stdout)
    assert "grid" in schema["properties"]
    bad = cli("config", "digits_mlp", "--set", "cluster.nope=1")
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
    # shipped examples by name, found inside the installed package; a shipped spec's base is one of them
    done = run("config", "digits_mlp")
    assert done.returncode == 0 and "digits-mlp" in done.stdout, done.stderr
    done = run("config", "demo")
    assert done.returncode == 0, done.stderr
    assert "syncbench/experiments/configs/digits_mlp.yaml" in done.stdout and str(REPO) not in done.stdout, done.stdout
    done = run("examples")
    assert done.returncode == 0 and "literature" in done.stdout and "mnist1d_cnn" in done.stdout, done.stderr


def test_mutant_list_in_docs_is_current():
    from benchmarks.mutation_check import MUTANTS, markdown_table

    assert markdown_table(MUTANTS) in (DOCS / "testing.md").read_text(), (
        "docs/testing.md's mutant table is out of date: regenerate it with "
        "`python -m benchmarks.mutation_check --markdown`")


def test_claims_reference_is_current():
    """docs/claims.md is generated from the claims' own definitions (measure, test, rule)."""
    from syncbench.analysis.claims_reference import markdown

    assert (DOCS / "claims.md").read_text() == markdown(), (
        "docs/claims.md is out of date: regenerate it with `python -m syncbench.analysis.claims_reference "
        "> docs/claims.md`")


# Placeholders the docs write in command lines, and what the checker puts in their place.
PLACEHOLDERS = {"CONFIG": "digits_mlp", "CONFIG.yaml": "digits_mlp", "SPEC": "digits_smoke",
                "SPEC.yaml": "digits_smoke", "SWEEP": "demo", "SWEEP_NAME": "demo", "N": "2", "K": "2", "P": "5000",
                "URI": "sqlite:///x.db", "NAME": "x", "KEY=VALUE": "seed=1"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `syncbench ...` command line in README.md and docs/*.md: fenced
    blocks and inline code, continuation lines joined, comments, `[optional]` parts and
    redirections dropped, `a && b` split."""
    import shlex

    found = []
    for page in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()] + inline
        for line in lines:
            for part in line.split("&&"):
                part = re.sub(r"\s#.*$", "", part).strip()
                part = re.sub(r"\[[^\]]*\]", "", part)
                part = part.split(">", 1)[0].strip()
                m = re.search(r"(?:^|\s)(?:python -m |\.venv/bin/)?syncbench\s+([a-z].*)$", part)
                if not m or part.startswith("pip"):
                    continue
                command, _, rest = m.group(1).partition(" ")
                command = command.split("|")[0]  # `run|sweep ... --profile FILE`
                for alternative in rest.split(" | "):  # `config CONFIG | --reference | --schema run|sweep`
                    try:
                        argv = [command, *shlex.split(alternative)]
                    except ValueError:
                        continue
                    found.append((page.name, [a.split("|")[0] if "|" in a else a for a in argv]))
    return found


def test_every_documented_command_line_parses_and_names_what_exists(tmp_path, monkeypatch):
    """A checker over the docs: every `syncbench ...` line uses a command and options that
    exist, and every config or spec it names is a file the docs' own example creates or a
    shipped example (so it works from a pip install outside a clone)."""
    from syncbench.sweeps.cli import build_parser
    from syncbench.sweeps.spec import resolve_example

    monkeypatch.chdir(tmp_path)  # outside a clone: a repository path such as experiments/configs/x.yaml fails
    parser = build_parser()
    commands = documented_commands()
    subcommands = {argv[0] for _, argv in commands}
    assert {"run", "sweep", "report", "calibrate", "config", "init", "examples", "ui"} <= subcommands, subcommands
    made_by_docs = ("my-project/", "proj/")  # written by the `syncbench init my-project` the docs show first
    for page, argv in commands:
        if argv[0] not in parser._subparsers._group_actions[0].choices or len(argv) == 1:
            continue  # prose ("syncbench runs any ..."), or a command named without its arguments
        filler = "digits_smoke" if argv[0] == "sweep" else "digits_mlp"  # `run ... --profile FILE`
        argv = [filler if a in ("...", "…") else PLACEHOLDERS.get(a, a) for a in argv]
        argv = [a.replace("FILE", str(tmp_path / "f.yaml")).replace("DIR", str(tmp_path / "d")) for a in argv]
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                raise AssertionError(f"{page}: `syncbench {' '.join(argv)}` is refused by the command line") from None
            continue
        for attr, kind in (("config", "config"), ("spec", "spec")):
            value = getattr(args, attr, None)
            if args.command in ("run", "calibrate", "sweep") and value and not value.startswith(made_by_docs):
                resolve_example(value, kind)  # raises ConfigError naming what is missing


def test_documented_example_names_validate(tmp_path):
    """Every shipped name the docs use validates as written (`syncbench config NAME`)."""
    names = {argv[1] for _, argv in documented_commands()
             if argv[0] in ("run", "sweep", "calibrate") and len(argv) > 1 and "/" not in argv[1]
             and argv[1] not in PLACEHOLDERS and not argv[1].startswith("-") and argv[1] not in ("...", "…")}
    assert {"digits_mlp", "demo", "literature"} & names or names, names
    for name in sorted(names):
        done = cli("config", name, cwd=tmp_path)
        assert done.returncode == 0, f"`syncbench config {name}`: {done.stderr}"
