"""docs/adding-a-strategy.md, as written: its example strategy (EASGD) and its registry line
are taken from the page, the file written to a temporary module and the line registered at
run time (``register``: what the line does in ``_REGISTRY``), then the contract suite's checks
run on it on both backends, its traits deciding which apply. Nothing else is edited, so this
fails if adding a strategy needs more than the page says: the config, the registry, both
backends, the contract suite, ``calibrate``'s closed form and the report take it as it is."""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncbench.strategies import STRATEGIES, register, traits, unregister
from tests import test_contract as contract

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "adding-a-strategy.md"
MODULE = "adding_a_strategy_example"  # the temporary module the page's file becomes


def doc_block(first_line: str) -> str:
    """The page's one ```python block whose first line is ``first_line``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
              if b.splitlines()[0].strip() == first_line]
    assert len(blocks) == 1, f"{DOC.name}: expected one python block starting {first_line!r}, found {len(blocks)}"
    return blocks[0]


def documented_line() -> tuple[str, str, str]:
    """(name, options "module:Class", strategy "module:Class") of the page's registry line."""
    block = doc_block("# strategies/registry.py, in _REGISTRY")
    (entry,) = [line for line in block.splitlines()[1:] if line.strip()]
    ((name, (options, strategy)),) = ast.literal_eval("{" + entry.strip() + "}").items()
    return name, options, strategy


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page's strategy, registered under the name its line gives; its module importable
    here and in the processes the dist backend starts."""
    source = doc_block("# strategies/easgd.py")
    name, options, strategy = documented_line()
    path = source.splitlines()[0].removeprefix("#").strip()  # strategies/easgd.py
    module = "syncbench." + path.removesuffix(".py").replace("/", ".")
    assert options.startswith(module + ":") and strategy.startswith(module + ":"), (options, strategy)
    assert not (REPO / path).exists() and name not in STRATEGIES, (
        f"the page's example {name} is shipped now ({path}): give the page an example that is not")
    where = tmp_path_factory.mktemp("example")
    (where / f"{MODULE}.py").write_text(source)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(where))
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(where), os.environ.get("PYTHONPATH")) if p))
        register(name, options.replace(module, MODULE, 1), strategy.replace(module, MODULE, 1))
        try:
            yield name
        finally:
            unregister(name)
            sys.modules.pop(MODULE, None)


def test_the_page_adds_a_strategy_with_a_section_of_its_own(example, digits_config):
    from syncbench.analysis.plots import strategy_color
    from syncbench.experiments.config import ConfigError
    from syncbench.experiments.procs.calibrate import predicted_per_update
    from syncbench.sweeps.reference import rows

    cls = STRATEGIES[example]
    assert cls.name == example and cls.traits is cls.options_model.traits
    config = digits_config(f"strategy.name={example}", f"strategy.{example}.period=2")
    options = config.strategy.options()
    assert isinstance(options, cls.options_model) and options.period == 2
    assert config.flat()[f"strategy.{example}.period"] == 2  # what MLflow records
    # absent, the section takes its defaults; a mistake in it is refused with its dotted key
    assert digits_config(f"strategy.name={example}").strategy.options() == cls.options_model()
    with pytest.raises(ConfigError, match=rf"strategy\.{example}\.perod: unknown key; did you mean "
                                          rf"strategy\.{example}\.period\?"):
        digits_config(f"strategy.name={example}", f"strategy.{example}.perod=2")
    # the config reference documents its keys; the report draws it in its declared colour
    keys = {r.key for r in rows("run")[0]}
    assert {f"strategy.{example}.period", f"strategy.{example}.moving_rate"} <= keys
    assert strategy_color(example) == traits(example).display_color
    # calibrate reads its clock's closed form from the class: a step + a ring all-reduce of
    # the state every `period` steps (N = 2: 2·α + S/β)
    payload = {"gradient_bytes": 1000, "state_bytes": 4000}
    assert predicted_per_update(example, 2, 1e-3, 1e-4, 1e6, payload, options) == \
        pytest.approx(1e-3 + (2e-4 + 4000 / 1e6) / 2)


# the contract suite's checks (tests/test_contract.py), on the page's strategy
def test_one_worker_is_plain_sgd_on_sim(example, digits_config):
    contract.check_one_worker_is_plain_sgd_on_sim(digits_config, example)


def test_sim_runs_are_bit_reproducible(example, digits_config, tmp_path):
    contract.check_sim_runs_are_bit_reproducible(digits_config, example, tmp_path)


def test_reaches_target_and_records_everything_on_sim(example, digits_config, tmp_path):
    contract.check_reaches_target_and_records_everything_on_sim(digits_config, example, tmp_path)


@pytest.mark.parametrize("scaling", ["none", "linear", "sqrt"])
def test_lr_scaling_scales_by_the_effective_batch_on_sim(example, digits_config, scaling):
    contract.check_lr_scaling_on_sim(digits_config, example, scaling)


@pytest.mark.heavy
def test_reaches_target_and_records_everything_on_dist(example, digits_config, tmp_path):
    contract.check_reaches_target_and_records_everything_on_dist(digits_config, example, tmp_path)


@pytest.mark.heavy
def test_one_worker_is_plain_sgd_on_dist(example, digits_config, tmp_path):
    # skipped for a strategy that declares it is not plain SGD at one worker (the sim case checks that)
    contract.check_one_worker_is_plain_sgd_on_dist(digits_config, example, tmp_path)


@pytest.mark.heavy
def test_both_backends_hold_the_same_parameters_after_the_same_steps(example, digits_config, tmp_path):
    if not contract.lockstep(example):
        pytest.skip(f"{example} has a parameter server: its pushes apply in arrival order")
    contract.check_both_backends_hold_the_same_parameters_after_the_same_steps(digits_config, example, tmp_path)
