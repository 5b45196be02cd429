"""The base config: every field of the harness once, with its default, the rule its value must pass
and what it means. An experiment is `base()` plus its recipe's differences (experiments/*.py);
`validate.check` takes its rules from `FIELDS` and `MODEL`, so a field and its rule stand together.

The defaults are the Keras tutorials' (CIFAR-10 split as Keras' `validation_split=0.2` splits it,
batch 128, 50 epochs, AdamW 1e-3 / weight decay 1e-4 with Keras' eps, PatchConvNet's warm-up-cosine
schedule, flip, x / 255) with every technique of the modern stack off. The model section is the
experiment's own (the set of its keys is recorded in each checkpoint): the base gives only
`model.impl`, and `MODEL` holds the rules of the fields a model may have.

Light on purpose: loading an experiment imports no JAX or TensorFlow.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections import config_dict

Rule = tuple[str, Callable[[Any], bool]]  # (what is allowed, in words; the test)


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
UNIT = number(0.0, 1.0)  # probabilities


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default (None: unset, a `kind` a flag can set), its rule, its meaning."""

    default: Any
    rule: Rule
    doc: str
    kind: type | None = None  # the type of a field whose default is None


def _unset(kind: type, rule: Rule, doc: str) -> Field:
    return Field(None, optional(rule), doc, kind)


FIELDS: dict[str, Field] = {
    "seed": Field(42, integer(0), "initialisation, dropout, augmentation and the data's order"),
    "init_from": _unset(str, text(), "start from saved weights: a workdir (its best checkpoint, or "
                        "its latest) or DIR/checkpoints/STEP (--mode=import makes one from the "
                        "official weights); the head starts afresh when the class count differs"),
    "dtype": Field("float32", one_of("float32", "bfloat16", "auto"),
                   "the compute dtype; 'auto': bfloat16 on GPU/TPU, float32 on CPU"),
    "cpu_devices": Field("auto", auto_or_count(), "CPU hosts: JAX devices to split the cores into "
                         "(data parallelism), 'auto' (2 where there are 2+ cores) or a count"),
    "host_memory": Field("auto", one_of("auto", "keep", "system"), "CPU runs: keep the memory XLA "
                         "frees after a step for the next ('auto': on glibc; host_memory.py)"),
    "batch_size": Field(128, integer(1), "global, over all devices: the examples per update"),
    "accumulate_steps": Field(1, integer(1), "k > 1: each update's gradient in k micro-batches "
                              "of batch_size / k (a k-th of the activation memory); 1: off"),
    "eval_batch_size": Field(128, integer(1), "global, over all devices"),
    "num_epochs": Field(50, integer(1), "passes over the training split"),
    "log_every_steps": Field(100, integer(1), "a console line and metrics every this many steps"),
    "steps_per_call": Field(1, integer(1), "train steps per jitted call (lax.scan): fewer "
                            "dispatches on GPU/TPU"),
    "unroll_steps": Field("auto", one_of("auto", "unroll", "loop"), "those steps as a loop or "
                          "unrolled; 'auto' unrolls on CPU, where XLA runs a loop body at about "
                          "half speed, and loops on GPU/TPU, where unrolling multiplies the "
                          "compile time by steps_per_call"),
    "attention_every_epochs": Field(0, integer(0), "attention maps of the first attention_images "
                                    "validation images every this many epochs "
                                    "(DIR/attention/epoch_005.png, TensorBoard); 0: none"),
    "attention_images": Field(16, integer(1), "how many validation images those maps show"),

    "dataset.name": Field("cifar10", text(), "a tfds dataset (sklearn_digits: offline)"),
    "dataset.num_classes": Field(10, integer(2), "checked against the dataset's label feature"),
    "dataset.data_dir": _unset(str, text(), "where tfds keeps it; None: tfds' default"),
    "dataset.download": Field(True, BOOLEAN, "prepare the dataset when it is missing"),
    "dataset.train_split": Field("train[:40000]", text(), "Keras' validation_split=0.2"),
    "dataset.val_split": Field("train[40000:]", text(), "the last 10,000 training images"),
    "dataset.test_split": Field("test", text(), "evaluated once, after the last epoch"),
    "dataset.image_key": Field("image", text(), "the dataset's image feature"),
    "dataset.label_key": Field("label", text(), "the dataset's label feature"),
    "dataset.resident_limit_mib": _unset(int, integer(0), "a split up to this size is decoded once "
                                         "and kept on every device (CIFAR: 120 MB); None: a "
                                         "quarter of a device's memory; 0: always stream"),
    "dataset.read_workers": _unset(int, integer(0), "decoding processes; None: one per core"),
    "dataset.prefetch": Field(2, integer(1), "streamed: calls' batches on the devices ahead"),
    "dataset.repeats": Field(1, integer(1), "repeated augmentation (DeiT's RASampler: 3): each "
                             "batch holds B / repeats examples, each `repeats` times; 1: off"),
    "dataset.image_size": _unset(int, integer(1), "images of mixed sizes reach image_size x "
                                 "image_size on the host; None: every image keeps its one size"),
    "dataset.crop": Field("resize", one_of("resize", "inception"), "'resize' squashes each image "
                          "to image_size; 'inception' takes Inception's random-resized crop"),
    "dataset.crop_scale": Field((0.08, 1.0), ordered_pair(number(0.0, 1.0, open_low=True)),
                                "Inception crop: its area as a fraction of the image (DeiT's)"),
    "dataset.crop_ratio": Field((3 / 4, 4 / 3), ordered_pair(POSITIVE),
                                "Inception crop: its width / height (DeiT's)"),
    "dataset.eval_crop_fraction": Field(1.0, number(0.0, 1.0, open_low=True), "evaluation: the "
                                        "shorter side to image_size / this, the centre kept "
                                        "(DeiT: 0.875); 1.0 squashes as 'resize'"),

    "preprocess.size": Field(32, integer(1), "the model's input size (evaluation resizes to it)"),
    "preprocess.train_resize": Field(32, integer(1), "training: resize to this before the crop"),
    "preprocess.crop": Field(0, integer(0), "training: a random crop of this size; 0: none"),
    "preprocess.flip": Field(True, BOOLEAN, "random horizontal flip (Keras RandomFlip)"),
    "preprocess.rotation": Field(0.0, number(0.0, 1.0), "Keras RandomRotation: up to this "
                                 "fraction of a full turn, reflect fill; 0: off"),
    "preprocess.contrast": Field(0.0, number(0.0, 1.0, open_high=True),
                                 "Keras RandomContrast: a factor in [1 - c, 1 + c]; 0: off"),
    "preprocess.zoom": Field(0.0, number(0.0, 1.0, open_high=True),
                             "Keras RandomZoom(z, z), reflect fill; 0: off"),
    "preprocess.normalize": Field("rescale", one_of("rescale", "standardize", "imagenet"), "last: "
                                  "x / 255, the training split's per-channel mean and std, or "
                                  "ImageNet's"),
    "preprocess.randaugment_ops": Field(0, integer(0), "timm's RandAugment after the steps above "
                                        "(DeiT: 2); 0: off"),
    "preprocess.randaugment_magnitude": Field(9.0, number(0.0, 10.0), "of 10 (DeiT: 9)"),
    "preprocess.randaugment_magnitude_std": Field(0.5, number(0.0), "its noise (DeiT: 0.5)"),
    "preprocess.erase_prob": Field(0.0, UNIT, "timm's RandomErasing (mode pixel, one box) after "
                                   "normalising (DeiT: 0.25); 0: off"),
    "preprocess.erase_area": Field((0.02, 1 / 3), ordered_pair(number(0.0, 1.0, open_low=True)),
                                   "the box's area as a fraction of the image (DeiT's)"),
    "preprocess.erase_aspect": Field((0.3, 1 / 0.3), ordered_pair(POSITIVE),
                                     "the box's height / width (DeiT's)"),

    "optimizer.name": Field("adamw", one_of("adamw", "lamb"), "LAMB needs weight_decay_mode "
                            "'lr_scaled'"),
    "optimizer.clip_grad_norm": Field(0.0, number(0.0), "clip the gradients' global norm to this "
                                      "first; 0: off"),
    "optimizer.learning_rate": Field(1e-3, POSITIVE, "the peak learning rate"),
    "optimizer.schedule": Field("warmup_cosine", one_of("constant", "warmup_cosine"),
                                "'warmup_cosine': linear warm-up from 0, cosine decay to 0"),
    "optimizer.warmup_fraction": Field(0.15, FRACTION, "of all steps ('warmup_cosine' only)"),
    "optimizer.weight_decay": Field(1e-4, number(0.0), "decoupled weight decay"),
    "optimizer.weight_decay_mode": Field("lr_scaled", one_of("lr_scaled", "per_step"), "scaled by "
                                         "the learning rate (optax, PyTorch, Keras 3) or not "
                                         "(tensorflow-addons)"),
    "optimizer.weight_decay_exclude": Field((), strings(), "parameters not decayed, by name part"),
    "optimizer.b1": Field(0.9, FRACTION, "Adam's beta 1"),
    "optimizer.b2": Field(0.999, FRACTION, "Adam's beta 2"),
    "optimizer.eps": Field(1e-7, POSITIVE, "Keras' default (PyTorch's: 1e-8)"),

    "loss.label_smoothing": Field(0.0, FRACTION, "of the one-hot (or mixed) targets"),

    "mixup.mixup_alpha": Field(0.0, number(0.0), "timm's Mixup of each batch with itself "
                               "reversed (DeiT: 0.8); both alphas 0: off"),
    "mixup.cutmix_alpha": Field(0.0, number(0.0), "timm's CutMix, the same way (DeiT: 1.0)"),
    "mixup.switch_prob": Field(0.5, UNIT, "CutMix rather than Mixup, when both are on"),
    "mixup.prob": Field(1.0, UNIT, "the probability that a batch is mixed"),

    "ema.decay": Field(0.0, FRACTION, "an exponential moving average of the parameters, "
                       "evaluated beside them (val/ema_top1) and saved; 0: off"),
    "ema.warmup": Field(False, BOOLEAN, "min(decay, (1 + step) / (10 + step)), TensorFlow's"),

    "checkpoint.every_steps": Field(0, integer(0), "0: at the end of every epoch (always there)"),
    "checkpoint.keep": Field(3, integer(1), "the last ones kept, plus the best by val top-1"),

    # --mode=benchmark's timing knobs: how long and how often it times, not what is computed
    "benchmark.warmup": Field(2, integer(0), "untimed blocks of `steps` calls before timing"),
    "benchmark.warmup_max": Field(12, integer(0), "more blocks, up to this many, until two in a row "
                                  "fault no memory in; warmup=0 turns both off"),
    "benchmark.repeats": Field(5, integer(1), "timings per step; the median is reported"),
    "benchmark.steps": Field(3, integer(1, 16), "calls per timing, queued at once: at most 16, as "
                             "XLA:CPU deadlocks with 32 calls queued on a device"),
    "benchmark.eval": Field(True, BOOLEAN, "also time the eval step"),
    "benchmark.matmul_sizes": Field((2048, 4096), sizes(), "CPU peak: square matmul sizes tried"),
    "benchmark.matmul_repeats": Field(5, integer(1), "timings per matmul size"),
    "benchmark.pipeline": Field(True, BOOLEAN, "time the input pipeline, real vs synthetic"),
    "benchmark.pipeline_batches": Field(100, integer(1), "batches of the streamed pipeline timed"),
    "benchmark.compare_steps": Field(5, integer(1, 16), "train steps per round, real and synthetic, "
                                     "queued at once: at most 16, as `steps`"),
    "benchmark.rounds": Field(4, integer(1), "alternating rounds of each; medians compared"),
    "benchmark.profile_steps": Field(0, integer(0), "> 0 (needs --workdir): trace that many steps"),

    "model.impl": Field("auto", one_of("auto", "reference", "fast"), "how the model is computed, "
                        "not what: plain Flax layers, attn_jax.fast (same function, faster on "
                        "CPU), or 'auto' (fast on CPU)"),
}


def _model_names() -> Rule:
    from attn_jax import models  # JAX: only when a config is checked

    return one_of(*models.model_names())


# The rules of the model fields, which each experiment sets (no defaults: a model's fields are its
# recipe's, and the set of them is recorded in its checkpoints). A callable builds its rule lazily.
MODEL: dict[str, Rule | Callable[[], Rule]] = {
    "name": _model_names,  # a model of attn_jax.models' registry
    "attention": one_of("external", "self"),  # EANet's external attention, or the ViT baseline's
    "tie_trunk": BOOLEAN,  # the tutorial PatchConvNet: one trunk block applied `depth` times
    "gelu_approximate": BOOLEAN,  # EANet's MLP: tanh GELU (True) or exact, erf (False)
    # sizes and counts
    **{k: integer(1) for k in ("dim", "depth", "se_ratio", "patch_size", "mlp_dim", "num_heads",
                               "dim_coefficient", "num_blocks", "memory_slots", "stem_convs")},
    # rates, in training only
    **{k: FRACTION for k in ("attention_dropout", "mlp_dropout", "projection_dropout",
                             "drop_path_rate")},
    "layer_scale_init": POSITIVE,  # the paper PatchConvNet's per-channel residual scale at init
    "mlp_ratio": POSITIVE,  # the paper PatchConvNet's class-attention MLP width over dim
}

RULES: dict[str, Rule | Callable[[], Rule]] = {
    **{key: f.rule for key, f in FIELDS.items()}, **{f"model.{k}": r for k, r in MODEL.items()}}
REQUIRED = (*FIELDS, "model.name")  # a config without one of these is refused


def base() -> ml_collections.ConfigDict:
    """A fresh ConfigDict of every field at its default (None fields typed, so a flag sets them)."""
    config = ml_collections.ConfigDict()
    for key, f in FIELDS.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[leaf] = config_dict.placeholder(f.kind) if f.default is None else f.default
    return config
