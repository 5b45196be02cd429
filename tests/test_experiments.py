"""The experiment files: each is the base config (attn_jax/config.py) plus its recipe, every variant
it lists in `VARIANTS` validates, an argument it does not list is refused in one line, and loading
one imports no JAX."""

import subprocess
import sys

import pytest
from conftest import ROOT, load_experiment

from attn_jax import config as base_config
from attn_jax import validate
from attn_jax.errors import UserError
from attn_jax.experiment import load_module

NAMES = sorted(path.stem for path in (ROOT / "experiments").glob("*.py"))
EXPERIMENTS = [(name, arg) for name in NAMES
               for arg in load_module(ROOT / "experiments" / f"{name}.py").VARIANTS]


def _field_type(config, key: str):
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    return node.get_type(leaf)


@pytest.mark.parametrize("name, arg", EXPERIMENTS)
def test_every_variant_is_the_base_plus_its_recipe(name, arg):
    """Valid, with every field of the base and no harness field of its own; a field left unset
    (None) keeps the base's type, so a --config flag can still set it."""
    config = load_experiment(name, arg)
    validate.check(config)
    fields = validate.leaves(config)
    assert set(base_config.REQUIRED) <= set(fields)
    assert {k for k in fields if not k.startswith("model.")} == {
        k for k in base_config.FIELDS if not k.startswith("model.")}
    base = base_config.base()
    for key, value in fields.items():
        if key in base_config.FIELDS:
            assert _field_type(config, key) is _field_type(base, key), key
            assert value is not None or _field_type(config, key) is base_config.FIELDS[key].kind


def test_every_default_passes_its_own_rule():
    assert validate.RULES is base_config.RULES  # validate keeps no rules of its own
    for key, field in base_config.FIELDS.items():
        allowed, test = field.rule
        assert test(field.default), f"{key}: {field.default!r} is not {allowed}"
        assert field.doc and (field.default is not None or field.kind is not None), key


@pytest.mark.parametrize("name", NAMES)
def test_an_argument_that_is_not_a_variant_is_refused_in_one_line(name):
    with pytest.raises(UserError, match=rf"^{name}\.py has no variant 'bogus': use ':\w+'.* or "
                                        r"(nothing|':\w+')$") as refused:
        load_experiment(name, "bogus")
    assert isinstance(refused.value, KeyError)  # config_flags passes it on whole, unlike a ValueError


def test_loading_every_experiment_imports_no_jax():
    code = ("import sys; from pathlib import Path; from attn_jax.experiment import load_module\n"
            "for path in Path('experiments').glob('*.py'):\n"
            "    module = load_module(path)\n"
            "    [module.get_config(arg) for arg in module.VARIANTS]\n"
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_launch_refuses_an_unknown_variant_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "launch.py", "--config=experiments/eanet.py:bogus",
                             f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: bad --config: eanet.py has no variant 'bogus': use ':smoke', ':modern' or nothing"]
    assert not (tmp_path / "run").exists()
