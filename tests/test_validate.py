"""Every config value is checked before any work (attn_jax/validate.py, by the rules of
attn_jax/config.py): each field of each experiment with a bad value gives one UserError naming it; a
few end-to-end launches check the line, the exit status and that no workdir appears."""

import math
import subprocess
import sys

import pytest
from conftest import ROOT, load_experiment
from test_experiments import EXPERIMENTS

from attn_jax import validate
from attn_jax.errors import UserError


def _bad_values(value):
    """Values of the field's own type (ml_collections refuses another type) that no rule allows."""
    if isinstance(value, bool):
        return []  # both values of a boolean are allowed
    if isinstance(value, int):
        return [-1, -10**9]
    if isinstance(value, float):
        return [-1.0, math.nan, math.inf]
    if isinstance(value, str):
        return ["", "  "] if value not in ("auto",) else ["", "fast"]
    if isinstance(value, tuple):
        return [(0,)] if value and isinstance(value[0], int) else [(1,)]
    return ["", 3] if value is None else []  # optional fields (placeholders)


@pytest.mark.parametrize("name, arg", EXPERIMENTS)
def test_every_field_of_every_experiment_is_validated(name, arg):
    config = load_experiment(name, arg)
    validate.check(config)  # the experiment itself is valid
    fields = validate.leaves(config)
    assert set(fields) <= set(validate.RULES)  # every field has a rule
    checked = 0
    for key, good in fields.items():
        for bad in _bad_values(good):
            broken = load_experiment(name, arg)
            section, _, leaf = key.rpartition(".")
            node = broken[section] if section else broken
            try:
                with node.ignore_type():
                    node[leaf] = bad
            except AttributeError:
                node[leaf] = bad
            rule = validate.RULES[key]
            allowed, test = rule() if callable(rule) else rule
            if test(bad):  # e.g. 3 for an optional integer: allowed
                continue
            with pytest.raises(UserError, match=rf"^config\.{key} is .*: use "):
                validate.check(broken)
            checked += 1
    assert checked >= len([v for v in fields.values() if not isinstance(v, bool)])


@pytest.mark.parametrize("key, value, match", [
    ("preprocess.crop", 40, r"config.preprocess.crop is 40: with a crop, it must equal"),
    ("model.name", "resnet", r"config.model.name is 'resnet': use one of .*'patch_convnet_tutorial'"),
    ("optimizer.schedule", "linear", r"use one of 'constant', 'warmup_cosine'"),
    ("dataset.crop", "inception", r"config.dataset.crop is 'inception' .*set dataset.image_size"),
    ("dataset.eval_crop_fraction", 0.875, r"eval_crop_fraction 0.875: .*set dataset.image_size"),
    ("dataset.crop_scale", (0.5, 0.2), r"crop_scale is \(0.5, 0.2\): use a pair \(low, high\)"),
    ("dataset.crop_ratio", (0.0, 1.0), r"use a pair \(low, high\), low <= high, each a number in \(0"),
])
def test_cross_field_and_enumerations(key, value, match):
    config = load_experiment("patch_convnet")
    section, _, leaf = key.rpartition(".")
    config[section][leaf] = value
    with pytest.raises(UserError, match=match):
        validate.check(config)


def test_an_unknown_field_is_refused():
    config = load_experiment("patch_convnet")
    config.optimizer.momentum = 0.9
    with pytest.raises(UserError, match="config.optimizer.momentum is not a field attn_jax reads"):
        validate.check(config)


@pytest.mark.parametrize("key", ["attention_images", "dataset.repeats", "ema.decay", "model.name"])
def test_a_missing_field_is_refused(key):
    """A config lacking a field of the base (or its model's name) is refused, so the code can read
    every field without a default of its own."""
    config = load_experiment("patch_convnet")
    section, _, leaf = key.rpartition(".")
    del (config[section] if section else config)[leaf]
    with pytest.raises(UserError, match=rf"^config\.{key} is missing: build the experiment on "
                                        r"attn_jax\.config\.base\(\)"):
        validate.check(config)


@pytest.mark.slow
@pytest.mark.parametrize("flag, line", [
    ("--config.num_epochs=-3", "error: config.num_epochs is -3: use an integer >= 1"),
    ("--config.loss.label_smoothing=1.5",
     "error: config.loss.label_smoothing is 1.5: use a number in [0.0, 1.0)"),
    ("--config.optimizer.learning_rate=-0.001",
     "error: config.optimizer.learning_rate is -0.001: use a number in (0.0, inf]"),
    ("--config.preprocess.normalize=unit",
     "error: config.preprocess.normalize is 'unit': use one of 'rescale', 'standardize', 'imagenet'"),
])
def test_launch_refuses_a_bad_value_before_any_work(tmp_path, flag, line):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "launch.py", "--config=experiments/patch_convnet.py",
                             f"--workdir={workdir}", flag], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert not workdir.exists()


@pytest.mark.parametrize("name, overrides, field", [
    ("eanet", {"model.patch_size": 3}, "model.patch_size"),  # 32 px in 3 px patches
    ("eanet", {"model.num_heads": 3}, "model.num_heads"),  # dim 64 over 3 heads
    ("vit", {"model.dim": 66}, "model.num_heads"),
    ("patch_convnet", {"model.se_ratio": 512}, "model.se_ratio"),
    ("patch_convnet_paper_cifar", {"model.stem_convs": 6}, "model.stem_convs"),  # 32 px / 64
])
def test_model_sizes_that_must_divide_are_checked_before_any_work(name, overrides, field):
    from conftest import with_overrides

    config = with_overrides(load_experiment(name), overrides)
    with pytest.raises(UserError, match=rf"^config\.{field} is "):
        validate.check(config)


@pytest.mark.parametrize("name", ["patch_convnet", "eanet", "vit"])
def test_modern_recipes_train_the_tutorial_networks_with_the_stack(name):
    """`:modern`: the tutorial's network (its dropouts off) on CIFAR-10, with RandAugment,
    Mixup/CutMix, label smoothing, an EMA and a warm-up-cosine schedule."""
    tutorial, modern = load_experiment(name), load_experiment(name, "modern")
    model = {k: v for k, v in modern.model.items() if "dropout" not in k}
    assert model == {k: v for k, v in tutorial.model.items() if "dropout" not in k}
    assert all(v == 0.0 for k, v in modern.model.items() if "dropout" in k)
    assert modern.dataset.name == "cifar10" and modern.dataset.num_classes == 10
    assert modern.num_epochs == 50 and modern.optimizer.schedule == "warmup_cosine"
    assert modern.preprocess.randaugment_ops == 2 and modern.mixup.cutmix_alpha == 1.0
    assert modern.loss.label_smoothing == 0.1 and modern.ema.decay > 0
