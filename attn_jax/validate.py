"""Every config value checked before any work, in one place: `check(config)` raises one `UserError`
naming the field, its value and what is allowed.

Each field an experiment may set has a rule in `RULES` (a field without one is refused, so a value
that nothing reads cannot pass silently); `_cross_field` checks the values that constrain each other.
What needs the dataset or the devices (the image key among the dataset's features, a batch that
divides over the devices) is checked where they are first opened, before compiling.
"""

import math
from collections.abc import Callable
from typing import Any

import ml_collections

from attn_jax.errors import UserError

Rule = tuple[str, Callable[[Any], bool]]  # (what is allowed, test)


def integer(low: int, high: int | None = None) -> Rule:
    allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    return allowed, lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= low
                               and (high is None or v <= high))


def number(low: float, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> Rule:
    left, right = ("(" if open_low else "["), (")" if open_high else "]")
    allowed = f"a number in {left}{low}, {'inf' if high is None else high}{right}"

    def test(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        above = v > low if open_low else v >= low
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    return allowed, test


def one_of(*choices) -> Rule:
    return "one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices


def auto_or_count() -> Rule:
    """"auto" or a positive count written as a string ("2"): a string field a flag can set."""
    return "'auto' or a count of at least 1 such as '2'", lambda v: v == "auto" or (
        isinstance(v, str) and v.isdigit() and int(v) >= 1)


def text() -> Rule:
    return "a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())


def optional(rule: Rule) -> Rule:
    return f"None or {rule[0]}", lambda v: v is None or rule[1](v)


def strings() -> Rule:
    return "a tuple of strings", lambda v: isinstance(v, tuple | list) and all(
        isinstance(s, str) for s in v)


def sizes() -> Rule:
    return "a non-empty tuple of integers >= 1", lambda v: isinstance(v, tuple | list) and bool(v) \
        and all(integer(1)[1](s) for s in v)


def ordered_pair(rule: Rule) -> Rule:
    """A (low, high) range: two values that each pass `rule`, low <= high."""
    allowed, test = rule
    return f"a pair (low, high), low <= high, each {allowed}", lambda v: (
        isinstance(v, tuple | list) and len(v) == 2 and all(test(x) for x in v) and v[0] <= v[1])


BOOLEAN: Rule = ("True or False", lambda v: isinstance(v, bool))
FRACTION = number(0.0, 1.0, open_high=True)  # dropout rates, label smoothing, Adam's betas
POSITIVE = number(0.0, open_low=True)


def _model_names() -> tuple[str, ...]:
    from attn_jax import models

    return tuple(models.model_names())


RULES: dict[str, Rule | Callable[[], Rule]] = {
    "seed": integer(0),
    "init_from": optional(text()),  # a workdir or checkpoint to start from (fine-tuning)
    "dtype": one_of("float32", "bfloat16", "auto"),
    "cpu_devices": auto_or_count(),
    "host_memory": one_of("auto", "keep", "system"),
    "batch_size": integer(1),
    "accumulate_steps": integer(1),  # micro-batches per optimizer update; 1: off
    "eval_batch_size": integer(1),
    "num_epochs": integer(1),
    "log_every_steps": integer(1),
    "steps_per_call": integer(1),
    "unroll_steps": one_of("auto", "unroll", "loop"),
    "attention_every_epochs": integer(0),
    "attention_images": integer(1),
    "dataset.name": text(),
    "dataset.num_classes": integer(2),
    "dataset.data_dir": optional(text()),
    "dataset.download": BOOLEAN,
    "dataset.train_split": text(),
    "dataset.val_split": text(),
    "dataset.test_split": text(),
    "dataset.image_key": text(),
    "dataset.label_key": text(),
    "dataset.image_size": optional(integer(1)),
    "dataset.resident_limit_mib": optional(integer(0)),
    "dataset.read_workers": optional(integer(0)),
    "dataset.prefetch": integer(1),
    "dataset.repeats": integer(1),  # repeated augmentation (DeiT's RASampler: 3); 1: off
    # ImageNet-style crops on the host (with dataset.image_size): the training crop, Inception's
    # area fraction and width / height ranges, and the evaluation centre crop's fraction
    "dataset.crop": one_of("resize", "inception"),
    "dataset.crop_scale": ordered_pair(number(0.0, 1.0, open_low=True)),
    "dataset.crop_ratio": ordered_pair(POSITIVE),
    "dataset.eval_crop_fraction": number(0.0, 1.0, open_low=True),
    "preprocess.size": integer(1),
    "preprocess.train_resize": integer(1),
    "preprocess.crop": integer(0),
    "preprocess.flip": BOOLEAN,
    "preprocess.rotation": number(0.0, 1.0),  # a fraction of a full turn, as Keras' RandomRotation
    "preprocess.contrast": number(0.0, 1.0, open_high=True),  # factor in [1 - c, 1 + c]
    "preprocess.zoom": number(0.0, 1.0, open_high=True),
    "preprocess.normalize": one_of("rescale", "standardize", "imagenet"),
    # timm's RandAugment (rand-m9-mstd0.5-inc1: 2 ops, magnitude 9 of 10, noise 0.5); 0 ops: off
    "preprocess.randaugment_ops": integer(0),
    "preprocess.randaugment_magnitude": number(0.0, 10.0),
    "preprocess.randaugment_magnitude_std": number(0.0),
    # timm's RandomErasing (mode "pixel", one box): probability 0 is off; the box's area as a
    # fraction of the image, its height / width ratio
    "preprocess.erase_prob": number(0.0, 1.0),
    "preprocess.erase_area": ordered_pair(number(0.0, 1.0, open_low=True)),
    "preprocess.erase_aspect": ordered_pair(POSITIVE),
    # timm's Mixup / CutMix, batch-wise: both alphas 0 is off
    "mixup.mixup_alpha": number(0.0),
    "mixup.cutmix_alpha": number(0.0),
    "mixup.switch_prob": number(0.0, 1.0),  # CutMix rather than Mixup when both are on
    "mixup.prob": number(0.0, 1.0),  # a batch is mixed with this probability
    "model.name": lambda: one_of(*_model_names()),
    "model.attention": one_of("external", "self"),
    "model.impl": one_of("auto", "reference", "fast"),
    "model.tie_trunk": BOOLEAN,
    "model.gelu_approximate": BOOLEAN,
    **{f"model.{k}": integer(1) for k in ("dim", "depth", "se_ratio", "patch_size", "mlp_dim",
                                          "num_heads", "dim_coefficient", "num_blocks",
                                          "memory_slots", "stem_convs")},
    **{f"model.{k}": FRACTION for k in ("attention_dropout", "mlp_dropout", "projection_dropout",
                                        "drop_path_rate")},
    "model.layer_scale_init": POSITIVE,
    "model.mlp_ratio": POSITIVE,
    "optimizer.name": one_of("adamw", "lamb"),
    "optimizer.clip_grad_norm": number(0.0),  # the gradients' global norm at most this; 0: off
    "optimizer.learning_rate": POSITIVE,
    "optimizer.schedule": one_of("constant", "warmup_cosine"),
    "optimizer.warmup_fraction": FRACTION,
    "optimizer.weight_decay": number(0.0),
    "optimizer.weight_decay_mode": one_of("lr_scaled", "per_step"),
    "optimizer.weight_decay_exclude": strings(),
    "optimizer.b1": FRACTION,
    "optimizer.b2": FRACTION,
    "optimizer.eps": POSITIVE,
    "loss.label_smoothing": FRACTION,
    "ema.decay": FRACTION,  # 0: no EMA of the parameters
    "ema.warmup": BOOLEAN,
    "checkpoint.every_steps": integer(0),
    "checkpoint.keep": integer(1),
    "benchmark.warmup": integer(0),
    "benchmark.warmup_max": integer(0),
    "benchmark.repeats": integer(1),
    "benchmark.steps": integer(1),
    "benchmark.eval": BOOLEAN,
    "benchmark.matmul_sizes": sizes(),
    "benchmark.matmul_repeats": integer(1),
    "benchmark.pipeline": BOOLEAN,
    "benchmark.pipeline_batches": integer(1),
    "benchmark.compare_steps": integer(1),
    "benchmark.rounds": integer(1),
    "benchmark.profile_steps": integer(0),
}


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
    """Raises a `UserError` for the first value of `config` that is not allowed."""
    for key, value in leaves(config).items():
        rule = RULES.get(key)
        if rule is None:
            raise UserError(f"config.{key} is not a field attn_jax reads: remove it from the "
                            "experiment (or fix its spelling)")
        allowed, test = rule() if callable(rule) else rule
        if not test(value):
            raise UserError(f"config.{key} is {value!r}: use {allowed}")
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
    batch must split into whole micro-batches (over the devices too: `train.check_accumulation`)."""
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
    if d.get("image_size") is None and (d.get("crop", "resize") != "resize"
                                        or d.get("eval_crop_fraction", 1.0) != 1.0):
        raise UserError(f"config.dataset.crop is {d.get('crop', 'resize')!r} and "
                        f"eval_crop_fraction {d.get('eval_crop_fraction', 1.0)}: these crops "
                        "output dataset.image_size x image_size images; set dataset.image_size "
                        "(e.g. 224), or use crop 'resize' and eval_crop_fraction 1.0")


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
