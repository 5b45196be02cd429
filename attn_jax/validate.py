"""Every config value checked before any work, in one place: `check(config)` raises one `UserError`
naming the field, its value and what is allowed.

The rules are attn_jax/config.py's, each beside its field (`config.RULES`): a field without one is
refused, so a value that nothing reads cannot pass silently, and a field of the base that a config
lacks is refused too, so the code reads `config.x`, never a default of its own. `_cross_field` checks
the values that constrain each other. What needs the dataset or the devices (the image key among the
dataset's features, a batch that divides over the devices) is checked where they are first opened,
before compiling.
"""

from typing import Any

import ml_collections

from attn_jax.config import REQUIRED, RULES
from attn_jax.errors import UserError


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"model.dim": 256, ...}: every value of `config` by its dotted path."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check(config: ml_collections.ConfigDict) -> None:
    """Raises a `UserError` for the first value of `config` that is not allowed, or the first field
    of the base that it lacks."""
    present = leaves(config)
    for key, value in present.items():
        rule = RULES.get(key)
        if rule is None:
            raise UserError(f"config.{key} is not a field attn_jax reads: remove it from the "
                            "experiment (or fix its spelling)")
        allowed, test = rule() if callable(rule) else rule
        if not test(value):
            raise UserError(f"config.{key} is {value!r}: use {allowed}")
    if missing := [key for key in REQUIRED if key not in present]:
        raise UserError(f"config.{missing[0]} is missing: build the experiment on "
                        "attn_jax.config.base(), which sets every field, or set it")
    _cross_field(config)


def _cross_field(config: ml_collections.ConfigDict) -> None:
    p = config.preprocess
    if p.crop and (p.crop != p.size or p.crop > p.train_resize):
        raise UserError(f"config.preprocess.crop is {p.crop}: with a crop, it must equal "
                        f"preprocess.size ({p.size}) and be at most preprocess.train_resize "
                        f"({p.train_resize}); or set crop to 0")
    _host_crops(config.dataset)
    _model_shapes(config.model, p.size)
    _optimizer(config)


def _optimizer(config: ml_collections.ConfigDict) -> None:
    """LAMB decays inside its trust ratio, so only the learning-rate-scaled convention applies; the
    batch must split into whole micro-batches (over the devices too:
    `optimizer.check_accumulation`)."""
    o = config.optimizer
    if o.name == "lamb" and o.weight_decay_mode != "lr_scaled":
        raise UserError(f"config.optimizer.weight_decay_mode is {o.weight_decay_mode!r}: LAMB "
                        "scales its weight decay by the learning rate and the trust ratio; use "
                        "'lr_scaled' with optimizer.name 'lamb'")
    if config.batch_size % config.accumulate_steps:
        raise UserError(f"config.accumulate_steps is {config.accumulate_steps}: it must divide "
                        f"config.batch_size ({config.batch_size}) into equal micro-batches")


def _host_crops(d: ml_collections.ConfigDict) -> None:
    """Inception crops and the evaluation centre crop output dataset.image_size x image_size."""
    if d.image_size is None and (d.crop != "resize" or d.eval_crop_fraction != 1.0):
        raise UserError(f"config.dataset.crop is {d.crop!r} and eval_crop_fraction "
                        f"{d.eval_crop_fraction}: these crops output dataset.image_size x "
                        "image_size images; set dataset.image_size (e.g. 224), or use crop "
                        "'resize' and eval_crop_fraction 1.0")


def _model_shapes(m: ml_collections.ConfigDict, size: int) -> None:
    """The model's sizes that must divide one another (else the model fails at its first trace)."""
    if "patch_size" in m and size % m.patch_size:
        raise UserError(f"config.model.patch_size is {m.patch_size}: it must divide "
                        f"preprocess.size ({size}) into whole patches")
    if "num_heads" in m and m.dim % m.num_heads:
        raise UserError(f"config.model.num_heads is {m.num_heads}: it must divide model.dim "
                        f"({m.dim})")
    if "se_ratio" in m and m.dim < m.se_ratio:
        raise UserError(f"config.model.se_ratio is {m.se_ratio}: squeeze-excite would reduce "
                        f"model.dim ({m.dim}) to no channel; use at most {m.dim}")
    if "stem_convs" in m and (size % 2 ** m.stem_convs or m.dim % 2 ** (m.stem_convs - 1)):
        raise UserError(f"config.model.stem_convs is {m.stem_convs}: 2^stem_convs must divide "
                        f"preprocess.size ({size}) and 2^(stem_convs - 1) model.dim ({m.dim})")
