"""Training and evaluation: data-parallel `jax.jit` steps over a 1-D device mesh named `data`.

The batch is sharded over `data`, the train state is replicated and its buffers donated; the same
code runs on one device, on eight, or on a multi-host slice. Reading order:
`create_learning_rate_fn`, `create_optimizer`, `create_train_state`, `cross_entropy`,
`train_step`, `eval_step`, `evaluate`, `train_and_evaluate`.
"""

import dataclasses
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import (
    attention_maps,
    checkpoint,
    data,
    inference,
    mixing,
    models,
    normalization,
    preprocess,
    progress,
    run_record,
    summary,
    validate,
    weight_decay,
    workdir_lock,
)
from attn_jax.errors import UserError
from attn_jax.metrics_log import MetricsLog, format_duration


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


TrainState = train_state.TrainState
Metrics = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# Mesh, model, optimizer, state
# ---------------------------------------------------------------------------------------------
def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def create_learning_rate_fn(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """config.optimizer.schedule: "constant", or "warmup_cosine" (linear from 0 over the first
    `warmup_fraction` of the steps, then cosine to 0 at `total_steps`, as in the tutorial)."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "warmup_cosine":
        warmup = int(total_steps * cfg.warmup_fraction)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    raise UserError(f"config.optimizer.schedule is {cfg.schedule!r}: "
                    "use 'constant' or 'warmup_cosine'")


def create_optimizer(cfg: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
    """config.optimizer.name: "adamw" (`adamw`) or "lamb" (optax.lamb: You et al. 2020, the
    PatchConvNet paper's optimizer), both with the same weight-decay mask and schedule; with
    `clip_grad_norm` > 0 the gradients are first clipped to that global norm
    (optax.clip_by_global_norm, as timm's --clip-grad with --clip-mode norm). Off, nothing is
    chained: the optimizer state is the one of runs saved before these options."""
    mask = functools.partial(weight_decay.decay_mask, exclude=cfg.weight_decay_exclude)
    if cfg.name == "adamw":
        tx = adamw(cfg, schedule, mask)
    elif cfg.name == "lamb":  # the decay is scaled by the learning rate and the trust ratio
        tx = optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=mask)
    else:
        raise UserError(f"config.optimizer.name is {cfg.name!r}: use 'adamw' or 'lamb'")
    if cfg.clip_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), tx)
    return tx


def adamw(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
          mask: Callable) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, in one of two conventions (config.optimizer.weight_decay_mode):

    - "lr_scaled": p -= lr * (adam + wd * p), as optax.adamw, Keras 3 and PyTorch (EANet tutorial).
    - "per_step": p -= lr * adam + wd * p, as tensorflow-addons' AdamW with a constant weight decay,
      which the PatchConvNet tutorial used: the decay does not follow the learning-rate schedule.
    """
    if cfg.weight_decay_mode == "lr_scaled":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask)
    if cfg.weight_decay_mode == "per_step":
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.scale_by_learning_rate(schedule, flip_sign=False),
            optax.add_decayed_weights(cfg.weight_decay, mask=mask),
            optax.scale(-1.0))
    raise UserError(f"config.optimizer.weight_decay_mode is {cfg.weight_decay_mode!r}: "
                    "use 'lr_scaled' or 'per_step'")


class EmaTrainState(TrainState):
    """A train state that also keeps an exponential moving average of the parameters
    (config.ema.decay > 0), updated by `update_ema` after every optimizer update. Without EMA a run
    keeps the plain `TrainState`, so its tree, and its checkpoints, are the ones of earlier runs."""

    ema_params: Any


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, int, int], mesh: Mesh, *,
                       ema: bool = False) -> TrainState:
    """Initialises parameters and optimizer state, replicated over `mesh`; with `ema`, an
    `EmaTrainState` whose average starts at the initial parameters (as timm's ModelEmaV2)."""

    def init(key):
        images = jnp.zeros((1, *image_shape), jnp.float32)
        params = model.init(key, images, train=False)["params"]
        if ema:
            return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                        ema_params=params)
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return jax.jit(init, out_shardings=NamedSharding(mesh, PartitionSpec()))(key)


def has_ema(state: TrainState) -> bool:
    return isinstance(state, EmaTrainState)


def with_ema(state: TrainState, ema: bool) -> TrainState:
    """`state` with an EMA slot (a copy of the parameters, to restore a saved average into) or
    without one: the tree of a checkpoint saved with or without EMA."""
    if ema == has_ema(state):
        return state
    fields = {"step": state.step, "apply_fn": state.apply_fn, "params": state.params,
              "tx": state.tx, "opt_state": state.opt_state}
    return EmaTrainState(**fields, ema_params=state.params) if ema else TrainState(**fields)


def ema_decay(step: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The EMA's decay for optimizer update number `step` (0 for the first): config.ema.decay, or
    with config.ema.warmup min(decay, (1 + step) / (10 + step)), tf.train.ExponentialMovingAverage's
    `num_updates` warm-up (0.1 at the first update, 0.9 at the 80th, 0.99 at the 890th), so the
    average forgets the initial parameters early in training. timm's ModelEmaV2 (DeiT) has none."""
    decay = jnp.asarray(cfg.decay, jnp.float32)
    if not cfg.warmup:
        return decay
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(state: EmaTrainState, cfg: ml_collections.ConfigDict) -> EmaTrainState:
    """After update number `state.step - 1`: ema <- decay * ema + (1 - decay) * params (timm's
    ModelEmaV2, optax.ema without debiasing), leaf by leaf in float32."""
    decay = ema_decay(state.step - 1, cfg)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, state.params)
    return state.replace(ema_params=ema)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with label smoothing: [B, C], [B] -> [B]."""
    return soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]), smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float) -> jax.Array:
    """`cross_entropy` against target distributions (Mixup/CutMix's mixed one-hots), smoothed as
    one-hot labels are: [B, C], [B, C] -> [B]. Smoothing is linear, so smoothing the mixed targets is
    mixing the smoothed ones, timm's mixup_target."""
    targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def metric_sums(logits: jax.Array, labels: jax.Array, losses: jax.Array,
                mask: jax.Array) -> Metrics:
    """Sums over the real (mask=True) examples: loss, top-1 and top-5 hits, and their count."""
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top5 = jax.lax.top_k(logits, k)[1]
    return {
        "loss": jnp.sum(losses * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def means(sums: Metrics) -> dict[str, float]:
    """Metric sums (fetched to the host) -> means; accuracies are fractions in [0, 1]."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    return {k: float(v) / count for k, v in sums.items() if k != "count"}


def train_step(state: TrainState, batch: dict, key: jax.Array, stats, *,
               config: ml_collections.ConfigDict) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch of uint8 images; returns metric sums over the batch.

    The step's randomness is `fold_in(key, step)`: a resumed run replays the same stream. The whole
    batch is augmented at once (one key per example), then `gradients` may split it into
    micro-batches; with EMA on, the average follows the updated parameters.
    """
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    if mixing.enabled(config.get("mixup")):  # a key of its own only then: the rest draw as before
        augment_key, mix_key = jax.random.split(augment_key)
    images = preprocess.for_train(batch["images"], augment_key, config.preprocess, stats)
    if mixing.enabled(config.get("mixup")):
        images, batch = mixed(images, batch, mix_key, config)
    grads, sums = gradients(state, {**batch, "images": images}, dropout_key, config)
    state = state.apply_gradients(grads=grads)
    if config.ema.decay:
        state = update_ema(state, config.ema)
    return state, sums


def mixed(images: jax.Array, batch: dict, key: jax.Array,
          config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
    """Mixup or CutMix of the whole global batch (`mixing.mix_batch`, config.mixup): the mixed
    images, and the batch with "targets" [B, C] for the loss and "labels" the dominant label of each
    mixed example, against which the train top-1 and top-5 are measured."""
    images, targets, dominant = mixing.mix_batch(images, batch["labels"],
                                                 config.dataset.num_classes, key, config.mixup)
    return images, {**batch, "labels": dominant, "targets": targets}


def loss_and_sums(params, batch: dict, dropout_key: jax.Array, *, apply_fn: Callable,
                  config: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """(mean loss, metric sums) of the model on a batch of model inputs: {"images" [B, H, W, C]
    float32, "labels" [B], "mask" [B]} -> ([], sums)."""
    logits, _ = apply_fn({"params": params}, batch["images"], train=True,
                         rngs={"dropout": dropout_key})
    if "targets" in batch:  # Mixup / CutMix: soft targets; "labels" holds the dominant label
        losses = soft_cross_entropy(logits, batch["targets"], config.loss.label_smoothing)
    else:
        losses = cross_entropy(logits, batch["labels"], config.loss.label_smoothing)
    return jnp.mean(losses), metric_sums(logits, batch["labels"], losses, batch["mask"])


def gradients(state: TrainState, batch: dict, dropout_key: jax.Array,
              config: ml_collections.ConfigDict) -> tuple[Any, Metrics]:
    """The gradient of the batch's mean loss and the batch's metric sums.

    With config.accumulate_steps = k > 1, the batch of B examples is split into k micro-batches of
    B / k (`micro_batches`), whose gradients a `lax.scan` sums inside this one jitted step, then
    divides by k: the mean of equal-sized micro-batches' means is the batch's mean, so one optimizer
    update sees the gradient of the whole batch, and activations are held for B / k examples only.
    Chosen over optax.MultiSteps, which would make every micro-batch a call that counts as a step:
    here `state.step`, the schedule, the logged step and the checkpoints all count optimizer updates,
    the batch still means the examples per update, and no half-accumulated gradient ever needs
    saving, so resume stays exact. Micro-batch j draws its dropout from fold_in(key, j) (k = 1 keeps
    the key itself); the augmentation was drawn for the whole batch before the split.
    """
    grad_fn = jax.grad(functools.partial(loss_and_sums, apply_fn=state.apply_fn, config=config),
                       has_aux=True)
    k = config.accumulate_steps
    if k == 1:
        return grad_fn(state.params, batch, dropout_key)

    def micro_step(total, xs):
        j, micro = xs
        step = grad_fn(state.params, micro, jax.random.fold_in(dropout_key, j))
        return jax.tree.map(jnp.add, total, step), None

    micros = micro_batches(batch, k)
    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micros),
                            dropout_key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(micro_step, zeros, (jnp.arange(k), micros))
    return jax.tree.map(lambda g: g / k, grads), sums


def micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B / k, ...]: micro-batch j holds examples j, j + k, j + 2k, ... so that each
    device's contiguous share of the batch holds B / (k * devices) examples of every micro-batch
    and the split moves no data between devices (hence a batch divisible by k * devices)."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def eval_step(state: TrainState, batch: dict, stats, *,
              config: ml_collections.ConfigDict) -> Metrics:
    """Metric sums of the model on a padded global batch; padding (mask=False) counts for nothing."""
    images = preprocess.for_eval(batch["images"], config.preprocess, stats)
    logits, attention = state.apply_fn({"params": state.params}, images, train=False)
    losses = cross_entropy(logits, batch["labels"], config.loss.label_smoothing)
    sums = metric_sums(logits, batch["labels"], losses, batch["mask"])
    if attention is not None:  # how peaked the class token's attention is: lower is sharper
        sums["attention_entropy"] = jnp.sum(attention_entropy(attention) * batch["mask"])
    return sums


def attention_entropy(attention: jax.Array) -> jax.Array:
    """Entropy in nats of each attention map: [B, N] -> [B]; log(N) for a uniform map, 0 for one
    patch."""
    attention = attention.astype(jnp.float32)
    return -jnp.sum(attention * jnp.log(jnp.clip(attention, 1e-12)), axis=-1)


def train_steps(state: TrainState, sums: Metrics, feed: dict, key: jax.Array, stats, *,
                config: ml_collections.ConfigDict, num_steps: int, resident: bool,
                mesh: Mesh) -> tuple[TrainState, Metrics]:
    """`num_steps` train steps in one call (a `lax.scan` over the steps when more than one), their
    metric sums added to `sums`.

    `feed` is either the device-resident split and the epoch's order (`resident`: each step gathers
    its batch by its step number, `data.batch_from_resident`) or `num_steps` stacked host batches.
    """
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def one_step(carry, i):
        state, sums = carry
        if resident:
            batch = data.batch_from_resident(feed, state.step, config.batch_size)
            batch = jax.lax.with_sharding_constraint(batch, sharded)
        else:
            batch = jax.tree.map(lambda x: x[i], feed)
        state, step_sums = train_step(state, batch, key, stats, config=config)
        return (state, jax.tree.map(jnp.add, sums, step_sums)), None

    if num_steps == 1:
        return one_step((state, sums), 0)[0]
    return jax.lax.scan(one_step, (state, sums), jnp.arange(num_steps),
                        unroll=unroll_steps(config.get("unroll_steps", "auto")))[0]


def unroll_steps(setting: str) -> bool:
    """config.unroll_steps: "unroll", "loop", or "auto": unroll on CPU (XLA:CPU ran a looped train
    step at half the speed of one step per call; unrolled, 1.28x faster: PatchConvNet, 8 steps) and
    loop elsewhere (unrolling multiplies the compile time by the steps per call)."""
    if setting == "auto":
        return jax.default_backend() == "cpu"
    if setting not in ("unroll", "loop"):
        raise UserError(f"config.unroll_steps is {setting!r}: use 'auto', 'unroll' or 'loop'")
    return setting == "unroll"


def jit_train_steps(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int,
                    resident: bool) -> Callable:
    """`train_steps` jitted over `mesh`: the train state and the metric sums replicated and donated;
    a resident feed replicated, stacked host batches sharded on `data` along the batch axis."""
    replicated = NamedSharding(mesh, PartitionSpec())
    feed = replicated if resident else NamedSharding(mesh, data.STACKED_BATCH_AXIS)
    return jax.jit(functools.partial(train_steps, config=config, num_steps=num_steps,
                                     resident=resident, mesh=mesh),
                   in_shardings=(replicated, replicated, feed, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0, 1))


def jit_steps(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Callable, Callable]:
    """`train_step` on a given global batch and `eval_step`, jitted over `mesh`: batch sharded on
    `data`, the rest replicated, the train state donated. (Runs call `jit_train_steps`; the
    benchmark times and counts FLOPs of this single step.)"""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    train = jax.jit(functools.partial(train_step, config=config),
                    in_shardings=(replicated, sharded, replicated, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=0)
    return train, jit_eval_step(config, mesh)


def jit_eval_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`eval_step` jitted over `mesh`: the batch sharded on `data`, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(functools.partial(eval_step, config=config),
                   in_shardings=(replicated, sharded, replicated), out_shardings=replicated)


def evaluate(eval_fn: Callable, state: TrainState, split: data.Split, local_batch: int,
             mesh: Mesh, stats) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over every example of `split`, each counted exactly once, and
    `examples`, the number of examples counted."""
    total = None
    for batch in data.prefetch_to_mesh(data.eval_batches(split, local_batch), mesh):
        sums = eval_fn(state, batch, stats)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return {**means(total), "examples": int(total["count"])}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything a run is made of, built the same way for training and for evaluation."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    splits: dict[str, data.Split]
    local_eval_batch: int
    steps_per_epoch: int
    total_steps: int
    model: nn.Module
    num_params: int
    schedule: optax.Schedule
    state: TrainState
    eval_fn: Callable
    train_key: jax.Array
    stats: dict | None
    feed: data.ResidentFeed | data.StreamedFeed | None = None  # built by `start_feed`
    train_calls: dict[int, Callable] = dataclasses.field(default_factory=dict)
    compiled_eval: Callable | None = None  # `eval_call`'s

    def start_feed(self) -> None:
        """Decodes the training split onto the devices (or starts streaming it)."""
        self.feed = data.make_feed(self.splits["train"], self.config.dataset, self.mesh,
                                   self.config.batch_size, self.config.seed)

    def compile(self) -> float:
        """Compiles the eval step ahead of time (`eval_call`); returns the seconds it took."""
        start = time.perf_counter()
        self.eval_call()
        return time.perf_counter() - start

    def eval_call(self) -> Callable:
        """The compiled eval step for the run's batch shape (compiled at its first use, once)."""
        if self.compiled_eval is None:
            batch = self._batch_spec(self.config.eval_batch_size)
            self.compiled_eval = self.eval_fn.lower(self.state, batch, self.stats).compile()
            self._synchronised()
        return self.compiled_eval

    def train_call(self, num_steps: int) -> Callable:
        """The compiled call of `num_steps` train steps (compiled at its first use, once per run)."""
        if num_steps not in self.train_calls:
            jitted = jit_train_steps(self.config, self.mesh, num_steps, self.feed.resident)
            feed = (next(self.feed.epoch(0, 0, [1])) if self.feed.resident else
                    self._batch_spec(self.config.batch_size, steps=num_steps))
            self.train_calls[num_steps] = jitted.lower(
                self.state, zero_sums(self.mesh), feed, self.train_key, self.stats).compile()
            self._synchronised()
        return self.train_calls[num_steps]

    def _batch_spec(self, size: int, steps: int | None = None) -> dict:
        """The abstract global batch of `size` examples; with `steps`, `steps` of them stacked."""
        lead, spec = ((), data.BATCH_AXIS) if steps is None else ((steps,), data.STACKED_BATCH_AXIS)
        sharding = NamedSharding(self.mesh, spec)
        shape = (*lead, size)
        return {"images": jax.ShapeDtypeStruct((*shape, *self.splits["train"].image_shape),
                                               jnp.uint8, sharding=sharding),
                "labels": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
                "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)}

    def _synchronised(self) -> None:
        """In a multi-process job, waits for every process to finish compiling, so none starts its
        first collective while another is still compiling (gloo would time out)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("attn_jax: steps compiled")

    @property
    def step(self) -> int:
        """The train state's step (a host sync)."""
        return int(self.state.step)

    @property
    def save_every(self) -> int:
        """Steps between checkpoints within an epoch (config.checkpoint.every_steps; 0: one per
        epoch, at its end)."""
        return self.config.checkpoint.every_steps or self.steps_per_epoch

    @property
    def description(self) -> dict:
        """What a checkpoint of this run records and a resume checks (`checkpoint.run_description`)."""
        return checkpoint.run_description(self.config)

    def evaluate(self, split: str, ema: bool = False) -> dict[str, float]:
        """Mean loss, top-1 and top-5 of the current state on split "train", "val" or "test"; with
        `ema`, of its EMA parameters (the same compiled step: the same tree, the params swapped)."""
        state = self.state.replace(params=self.state.ema_params) if ema else self.state
        return evaluate(self.eval_call(), state, self.splits[split], self.local_eval_batch,
                        self.mesh, self.stats)

    def evaluate_logged(self, split: str) -> dict[str, float]:
        """`evaluate(split)` as logged: {"val/loss", ...}, and with EMA {"val/ema_loss", ...}."""
        metrics = _prefixed(split, self.evaluate(split))
        if has_ema(self.state):
            metrics |= {f"{split}/ema_{k}": v for k, v in self.evaluate(split, ema=True).items()
                        if k != "examples"}
        return metrics


def load_splits(config: ml_collections.ConfigDict) -> dict[str, data.Split]:
    """The train, val and test splits; the evaluation splits decoded into host memory once where
    they fit (`data.fits_in_host_memory`), one copy when val and test are the same split (the
    training split is put on the devices by `Run.start_feed`)."""
    by_name: dict[str, data.Split] = {}
    splits = {}
    for name in ("train", "val", "test"):
        split_name = getattr(config.dataset, f"{name}_split")
        if name == "train" or split_name not in by_name:
            split = data.load_split(config.dataset, split_name)
            if name != "train" and data.fits_in_host_memory(split):
                split = split.in_memory()
            by_name.setdefault(split_name, split)
        splits[name] = split if name == "train" else by_name[split_name]
    return splits


def build_run(config: ml_collections.ConfigDict, mesh: Mesh, workdir: Path) -> Run:
    """Loads the splits and builds the model, optimizer, initial state and jitted eval step."""
    validate.check(config)
    data.local_batch_size(config.batch_size, mesh)  # a clear error for a batch that does not divide
    check_accumulation(config.batch_size, config.accumulate_steps, mesh)
    local_eval_batch = data.local_batch_size(config.eval_batch_size, mesh)
    splits = load_splits(config)
    steps_per_epoch = splits["train"].num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"config.batch_size {config.batch_size} is larger than the training split "
                        f"({splits['train'].num_examples} examples): lower it")
    total_steps = steps_per_epoch * config.num_epochs
    stats = None  # per-channel mean and std of the training split, cached in the workdir
    if config.preprocess.normalize == "standardize":
        stats = {k: jnp.asarray(v, jnp.float32) for k, v in normalization.channel_stats(
            splits["train"], workdir / "normalization.json",
            key=normalization.cache_key(config.dataset.name, config.dataset.train_split)).items()}

    data.check_num_classes(config.dataset)
    model, schedule, state = initial_state(config, mesh, total_steps)
    image_shape = (config.preprocess.size, config.preprocess.size, 3)
    train_key = jax.random.split(jax.random.key(config.seed))[1]
    # Replicated over the mesh once, so no call re-shards them (a jitted identity: device_put cannot
    # place on other processes' devices).
    train_key, stats = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))(
        (train_key, stats))
    return Run(config, mesh, splits, local_eval_batch, steps_per_epoch, total_steps, model,
               summary.total_params(model, image_shape), schedule, state,
               jit_eval_step(config, mesh), train_key, stats)


def initial_state(config: ml_collections.ConfigDict, mesh: Mesh,
                  total_steps: int) -> tuple[nn.Module, optax.Schedule, TrainState]:
    """The model, learning-rate schedule and initial train state of `config` (no data needed)."""
    model = models.create_model(config, config.dataset.num_classes)
    image_shape = (config.preprocess.size, config.preprocess.size, 3)
    schedule = create_learning_rate_fn(config.optimizer, total_steps)
    tx = create_optimizer(config.optimizer, schedule)
    init_key = jax.random.split(jax.random.key(config.seed))[0]
    state = create_train_state(model, tx, init_key, image_shape, mesh, ema=config.ema.decay > 0)
    return model, schedule, state


# The classifier: the one layer whose shape follows the class count (every model names it so).
HEAD = "head"


def warm_start(state: TrainState, source: str) -> tuple[TrainState, str]:
    """config.init_from: `state` with the parameters saved at `source` (`checkpoint.locate`: a
    workdir's best checkpoint, or DIR/checkpoints/STEP) in place of its initial ones; returns it
    and a line saying what was loaded.

    Every parameter of the model must be saved there with its shape, except the classifier `head`
    when the class count differs: it keeps this run's initialisation (the model's own: normal(0.02)
    kernel and zero bias in the paper's PatchConvNet, as the official `reset_classifier` leaves
    PyTorch's default instead). The step, the optimizer state and the schedule start afresh; an
    EMA starts at the loaded parameters. The raw parameters are loaded, not an EMA.
    """
    workdir, step = checkpoint.locate(source)
    ckpt = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
    try:
        saved = ckpt.restore_params(step)
    finally:
        ckpt.close()
    params, fresh = merge_params(state.params, saved, f"config.init_from={source}")
    state = warm_state(state, params)
    kept = f"; the {HEAD} starts afresh ({', '.join(fresh)}: another class count)" if fresh else ""
    return state, f"initialised from the checkpoint at step {step} in {workdir}{kept}"


def warm_state(state: TrainState, params) -> TrainState:
    """`state` with `params` (host arrays, the tree of its own) placed as its initial parameters
    are, as its EMA too where it keeps one."""
    # A jitted identity: device_put cannot place on other processes' devices
    params = jax.jit(lambda tree: tree, out_shardings=jax.tree.map(lambda x: x.sharding,
                                                                   state.params))(params)
    state = state.replace(params=params)
    if has_ema(state):  # its own buffers: a train step donates both trees, which must not alias
        state = state.replace(ema_params=jax.tree.map(jnp.copy, params))
    return state


def merge_params(params, saved, source: str):
    """(`params` with every leaf replaced by `saved`'s at the same path, the head's leaves of
    another shape kept; the paths kept). Any other missing, extra or misshapen leaf is one
    `UserError` naming it."""
    flat_saved = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    problems, fresh = [], []

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        value = flat_saved.pop(name, None)
        if value is not None and tuple(value.shape) == tuple(leaf.shape):
            return np.asarray(value, leaf.dtype)
        if value is not None and str(path[0].key) == HEAD:
            fresh.append(name)
            return leaf
        problems.append(f"{name} is missing there" if value is None else
                        f"{name} has shape {tuple(value.shape)} there, {tuple(leaf.shape)} here")
        return leaf

    merged = jax.tree_util.tree_map_with_path(take, params)
    problems += [f"{name} is there but not in this model" for name in flat_saved]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{source}: its parameters do not fit this config's model: {problems[0]}"
                        f"{more}; start from a run of the same model (config.model)")
    return merged, fresh


def check_accumulation(batch_size: int, k: int, mesh: Mesh) -> None:
    """A `UserError` unless the global batch splits into k micro-batches spread evenly over the
    mesh's devices (`micro_batches`)."""
    devices = mesh.devices.size
    if batch_size % (k * devices):
        raise UserError(f"config.batch_size {batch_size} does not split into "
                        f"config.accumulate_steps={k} micro-batches over {devices} devices: use a "
                        f"multiple of {k * devices}")


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def _check_finite(metrics: dict[str, float], step: int, epoch: int) -> None:
    if not math.isfinite(metrics["loss"]):
        raise TrainingDiverged(
            f"training loss is {metrics['loss']} at step {step} (epoch {epoch}): the run diverged; "
            "lower config.optimizer.learning_rate or lengthen the warm-up")


def zero_sums(mesh: Mesh) -> Metrics:
    """Empty training-metric accumulators, replicated over `mesh`."""
    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
    return jax.device_put(zeros, NamedSharding(mesh, PartitionSpec()))


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop after the current step (`.received`)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _finished_run(workdir: Path) -> dict | None:
    """A finished run's summary (its `summary.json`), after saying so; None for an unfinished one.
    Relaunching a finished run changes nothing in its workdir."""
    path = workdir / "summary.json"
    if not path.exists():
        return None
    if jax.process_index() == 0:
        print(f"the run in {workdir} is finished ({path}): nothing to do. Evaluate it with "
              "--mode=eval, or train another run (a longer one, another config) in another "
              "--workdir", flush=True)
    return json.loads(path.read_text())


def _refuse_to_start_over(workdir: Path) -> None:
    """A workdir holding a run's logs but no checkpoint to resume from is not started afresh over
    them."""
    logs = [name for name in ("metrics.jsonl", "attention", "curves.png")
            if (workdir / name).exists() and (workdir / name).stat().st_size]
    if logs:
        raise UserError(f"{workdir} holds a run's outputs ({', '.join(logs)}) but no checkpoint to "
                        "resume from: use another --workdir, or move those files away to start "
                        "afresh")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None,
                       hparams: dict | None = None) -> dict | None:
    """Trains `config` for config.num_epochs, evaluating on the validation split after each epoch
    and on the test split at the end; writes the outputs listed in the README into `workdir`.

    Resumes from the latest checkpoint in `workdir/checkpoints` if there is one: same step, PRNG
    stream and position in the epoch's shuffle, so the run ends exactly as an uninterrupted one.
    Returns the final metrics (also written to `workdir/summary.json`), or None when stopped early
    by SIGTERM/SIGINT (after saving a checkpoint). One run at a time holds the workdir
    (`workdir_lock`). `hparams` (launch.py: the config overrides of the run, or of its sweep point)
    are written with the final metrics as TensorBoard's HParams summary; by default the seed.
    """
    workdir = Path(workdir)
    stop = StopSignals()  # from the start: a signal during start-up or compilation is honoured too
    try:
        with workdir_lock.hold(workdir):
            return _train_and_evaluate(config, workdir, create_mesh() if mesh is None else mesh,
                                       stop, {"seed": config.seed} if hparams is None else hparams)
    finally:
        stop.restore()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh,
                        stop: StopSignals, hparams: dict) -> dict | None:
    """Start-up (restore or refuse, record, compile), the epochs, then the test and the results."""
    run = build_run(config, mesh, workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    sums = zero_sums(mesh)
    restored = ckpt.restore_latest(run.state, sums, run.description)
    if (finished := _finished_run(workdir)) is not None:
        ckpt.close()
        return finished
    if restored is None:
        _refuse_to_start_over(workdir)
        if config.init_from:  # a resumed run continues from its own checkpoint instead
            run.state, warm_note = warm_start(run.state, config.init_from)
    else:
        run.state, sums = restored
    run_record.check_and_record(workdir, config, mesh, resuming=restored is not None)
    run.start_feed()
    compile_seconds = run.compile()
    if stop.received:  # before the first step: nothing new to save, nothing written yet
        return _stopped_before_training(ckpt, stop.received, run.step, restored is not None)
    log = MetricsLog(workdir, config, resume_step=run.step if restored is not None else None)
    if restored is None and config.init_from:
        log.info(warm_note)
    _log_start(log, run, ckpt, restored is not None, compile_seconds)
    pace = progress.Pace(run.total_steps, run.step, config.batch_size, enabled=log.is_writer)
    start = time.perf_counter()
    try:
        stopped = _train_epochs(run, sums, log, ckpt, pace, stop)
    finally:
        pace.close()
        ckpt.wait()  # the last checkpoint committed, even when a signal came meanwhile
    if stopped:
        log.info(f"received {stop.received}: saved a checkpoint at step {run.step}; relaunch the "
                 "same command to resume")
        log.close()
        return None
    return _finish(run, log, ckpt, pace, time.perf_counter() - start, stop, hparams)


class DispatchQueue:
    """Keeps at most two train calls queued on the devices. JAX dispatches asynchronously, so the
    loop would otherwise queue every call up to the next log line (which waits for its metrics):
    measured, 13 calls of 8 CIFAR steps, 200 s of work that a SIGTERM had to wait for before its
    checkpoint, beyond a scheduler's usual grace period. One call queued behind the running one
    keeps the devices as busy."""

    def __init__(self):
        self._previous = None

    def dispatched(self, step: jax.Array) -> None:
        """After dispatching a call whose new step counter is `step`: waits for the call before it."""
        if self._previous is not None:
            self._previous.block_until_ready()
        self._previous = step + 0  # a copy: the next call donates the state that holds `step`


def _train_epochs(run: Run, sums: Metrics, log: MetricsLog, ckpt: checkpoint.Checkpointer,
                  pace: progress.Pace, stop: StopSignals) -> bool:
    """Trains from the state's step to the last, in calls of `data.call_sizes` steps; logs, saves and
    validates on schedule. Returns whether a signal stopped it (after saving a checkpoint)."""
    config, step = run.config, run.step
    queue = DispatchQueue()
    for epoch in range(step // run.steps_per_epoch, config.num_epochs):
        epoch_end = (epoch + 1) * run.steps_per_epoch
        sizes = data.call_sizes(step, epoch_end, config.steps_per_call,
                                (config.log_every_steps, run.save_every))
        for n, feed in zip(sizes, run.feed.epoch(epoch, step % run.steps_per_epoch, sizes),
                           strict=True):
            run.state, sums = run.train_call(n)(run.state, sums, feed, run.train_key, run.stats)
            queue.dispatched(run.state.step)
            step += n
            pace.stepped(n, sums)
            if step % config.log_every_steps == 0 or step == epoch_end:
                sums = _log_train(run, log, pace, sums, step, epoch + 1)
            # At the epoch's end the validation below saves; before it, a signal or the cadence.
            if step < epoch_end and (stop.received or step % run.save_every == 0):
                ckpt.save(run.state, sums, run.description)
            if step < epoch_end and stop.received:
                return True
        _end_epoch(run, log, ckpt, pace, sums, step, epoch + 1)
        if stop.received:
            return True
    return False


def _log_train(run: Run, log: MetricsLog, pace: progress.Pace, sums: Metrics, step: int,
               epoch: int) -> Metrics:
    """Writes the log interval's training metrics (the one host sync per interval); returns fresh
    accumulators. Raises `TrainingDiverged` on a NaN or infinite loss."""
    metrics = means(sums)
    _check_finite(metrics, step, epoch)
    log.write(step, epoch, {**_prefixed("train", metrics),
                            "learning_rate": float(run.schedule(step - 1))})
    pace.logged(step, metrics["loss"])
    return zero_sums(run.mesh)


def _end_epoch(run: Run, log: MetricsLog, ckpt: checkpoint.Checkpointer, pace: progress.Pace,
               sums: Metrics, step: int, epoch: int) -> None:
    """Validates, saves a checkpoint with the validation metrics (for 'best'), says where the run
    is, and draws the attention maps when due. Not counted in the training throughput."""
    config = run.config
    with pace.paused():
        val = run.evaluate_logged("val")
        log.write(step, epoch, val)
        ckpt.save(run.state, sums, run.description, metrics=val)
        log.info(f"epoch {epoch}/{config.num_epochs} step {step}: {log.epoch_line()} | "
                 f"{pace.median():.0f} img/s | ETA {format_duration(pace.eta(step))}")
        if (every := config.get("attention_every_epochs", 0)) and epoch % every == 0:
            inference.render_epoch(run, log, epoch)  # DIR/attention/epoch_XXX.png


def _finish(run: Run, log: MetricsLog, ckpt: checkpoint.Checkpointer, pace: progress.Pace,
            seconds: float, stop: StopSignals, hparams: dict) -> dict:
    """Evaluates on the test split and writes the results: `summary.json`, `curves.png` and the
    HParams summary."""
    config = run.config
    test = run.evaluate_logged("test")
    log.write(run.step, config.num_epochs, test)
    final = {**log.latest(), "num_params": run.num_params,
             "train_images_per_s": pace.median() or None, "wall_time_s": seconds}
    log.info(f"test: loss {test['test/loss']:.4f} top1 {100 * test['test/top1']:.2f}% "
             f"top5 {100 * test['test/top5']:.2f}%")
    log.write_hparams(hparams, {k: v for k, v in final.items() if k.startswith(("val/", "test/"))})
    log.write_json("summary.json", final)
    if log.is_writer:
        attention_maps.plot_curves(log.workdir / "metrics.jsonl", log.workdir / "curves.png")
    if stop.received:  # during the last evaluation or the writing of the results
        log.info(f"received {stop.received} while finishing: the run is finished and its results "
                 "are written")
    log.close()
    ckpt.close()
    return final


def _stopped_before_training(ckpt: checkpoint.Checkpointer, signal_name: str, step: int,
                             resumed: bool) -> None:
    kept = f"the checkpoint at step {step} is kept" if resumed else "nothing saved"
    if jax.process_index() == 0:
        print(f"received {signal_name} before the first step: {kept}; relaunch the same command "
              "to continue", flush=True)
    ckpt.close()


def _micro_batches_note(k: int) -> str:
    return f" (accumulated over {k} micro-batches)" if k > 1 else ""


def _log_start(log: MetricsLog, run: Run, ckpt: checkpoint.Checkpointer, resumed: bool,
               compile_seconds: float) -> None:
    config = run.config
    if resumed:
        log.info(f"resumed from the checkpoint at step {run.step} in {ckpt.directory}")
    log.info(f"{config.model.name}: {run.num_params:,} parameters; {run.steps_per_epoch} steps/"
             f"epoch x {config.num_epochs} epochs on {run.mesh.devices.size} device(s) "
             f"({jax.default_backend()}), global batch {config.batch_size}"
             f"{_micro_batches_note(config.accumulate_steps)}, "
             f"{config.steps_per_call} step(s) per call, training data "
             f"{'on the devices' if run.feed.resident else 'streamed'}; eval step compiled in "
             f"{compile_seconds:.1f}s")
