"""Training and evaluation: data-parallel `jax.jit` steps over a 1-D device mesh named `data`.

The batch is sharded over `data`, the train state is replicated and its buffers donated; the same
code runs on one device, on eight, or on a multi-host slice. This module holds the steps and the
loop; what they are built from lives beside it: the metric sums (`metrics`), the optimizer and
gradient accumulation (`optimizer`), the train state and its EMA (`state`), config.init_from
(`warm_start`), stopping and relaunching safely (`run_guard`), the splits and the feeds that bring
their batches to the steps (`data`).

Reading order, which the file follows:

1. The steps: `train_step`, one optimizer update (Mixup/CutMix by `mixing`; the `gradients` of
   `loss_and_sums`, whose `cross_entropy` / `soft_cross_entropy` is the loss, in micro-batches
   with config.accumulate_steps), and `eval_step`.
2. The jitted forms: `train_call`, K train steps in one call, each taking its batch from the
   feed's input (`data.ResidentFeed.batch`, `data.StreamedFeed.batch`), jitted by
   `jit_train_call`; `jit_train_step` (one step on a given batch: the benchmark's) and
   `jit_eval_step`; `evaluate` over a split.
3. The run: `Run`, everything a run is made of, with its compiled calls
   (`compiled_train_call(k)`, `compiled_eval_step()`), and `build_run`.
4. The epoch loop: `_train_epochs`, logging (`_log_train`), the epoch's end (`_end_epoch`, with
   the attention grid of `_draw_attention`), the results (`_finish`).
5. `train_and_evaluate`: start-up (restore or refuse, record, compile), the loop, the results.
"""

import dataclasses
import functools
import math
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import (
    attention_maps,
    checkpoint,
    data,
    inference,
    mixing,
    model_stats,
    normalization,
    preprocess,
    progress,
    run_record,
    validate,
    workdir_lock,
)
from attn_jax.errors import UserError, one_line
from attn_jax.metrics import Metrics, attention_entropy, means, metric_sums, zero_sums
from attn_jax.metrics_log import MetricsLog, check_readable, format_duration
from attn_jax.optimizer import accumulated_gradients, check_accumulation
from attn_jax.run_guard import DispatchQueue, StopSignals, finished_run, refuse_to_start_over, relaunch_advice
from attn_jax.state import TrainState, has_ema, initial_state, run_keys, update_ema
from attn_jax.warm_start import warm_start


# ---------------------------------------------------------------------------------------------
# 1. The steps
# ---------------------------------------------------------------------------------------------
def train_step(state: TrainState, batch: dict, key: jax.Array, stats, *,
               config: ml_collections.ConfigDict) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch of uint8 images; returns metric sums over the batch.

    The step's randomness is `fold_in(key, step)`: a resumed run replays the same stream. The whole
    batch is augmented at once (one key per example), then Mixup or CutMix (config.mixup,
    `mixing.mix_batch`) gives it "targets" [B, C] for the loss and as "labels" each mixed example's
    dominant label, against which the train top-1 and top-5 are measured; `gradients` may split it
    into micro-batches; with EMA on, the average follows the updated parameters.
    """
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    if mixing.enabled(config.mixup):  # a key of its own only then: the rest draw as before
        augment_key, mix_key = jax.random.split(augment_key)
    images = preprocess.for_train(batch["images"], augment_key, config.preprocess, stats)
    if mixing.enabled(config.mixup):
        images, targets, dominant = mixing.mix_batch(images, batch["labels"],
                                                     config.dataset.num_classes, mix_key, config.mixup)
        batch = {**batch, "labels": dominant, "targets": targets}
    grads, sums = gradients(state, {**batch, "images": images}, dropout_key, config)
    state = state.apply_gradients(grads=grads)
    if config.ema.decay:
        state = update_ema(state, config.ema)
    return state, sums


def gradients(state: TrainState, batch: dict, dropout_key: jax.Array,
              config: ml_collections.ConfigDict) -> tuple[Any, Metrics]:
    """The gradient of the batch's mean loss and the batch's metric sums, in config.accumulate_steps
    micro-batches (`optimizer.accumulated_gradients`: still one update, with the whole batch's
    gradient; 1: the batch at once)."""
    grad_fn = jax.grad(functools.partial(loss_and_sums, apply_fn=state.apply_fn, config=config),
                       has_aux=True)
    return accumulated_gradients(grad_fn, state.params, batch, dropout_key,
                                 config.accumulate_steps)


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


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with label smoothing: [B, C], [B] -> [B]."""
    return soft_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]), smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float) -> jax.Array:
    """`cross_entropy` against target distributions (Mixup/CutMix's mixed one-hots), smoothed as
    one-hot labels are: [B, C], [B, C] -> [B]. Smoothing is linear, so smoothing the mixed targets is
    mixing the smoothed ones, timm's mixup_target."""
    targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


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


# ---------------------------------------------------------------------------------------------
# 2. The jitted forms
# ---------------------------------------------------------------------------------------------
def train_call(state: TrainState, sums: Metrics, inputs: dict, key: jax.Array, stats, *,
               config: ml_collections.ConfigDict, num_steps: int,
               batch_of: Callable[[dict, jax.Array, Any], dict]) -> tuple[TrainState, Metrics]:
    """`num_steps` train steps in one call (a `lax.scan` over the steps when more than one), their
    metric sums added to `sums`. Step i of the call takes its batch from the feed's input `inputs`
    as `batch_of(inputs, state.step, i)` says (the feed's `batch`)."""

    def one_step(carry, i):
        state, sums = carry
        state, step_sums = train_step(state, batch_of(inputs, state.step, i), key, stats,
                                      config=config)
        return (state, jax.tree.map(jnp.add, sums, step_sums)), None

    if num_steps == 1:
        return one_step((state, sums), 0)[0]
    return jax.lax.scan(one_step, (state, sums), jnp.arange(num_steps),
                        unroll=unroll_steps(config.unroll_steps))[0]


def unroll_steps(setting: str) -> bool:
    """config.unroll_steps: "unroll", "loop", or "auto": unroll on CPU, where XLA:CPU runs a loop body
    at about half speed (docs/performance.md#steps-per-call-on-cpu), and loop elsewhere (unrolling
    multiplies the compile time by the steps per call)."""
    if setting == "auto":
        return jax.default_backend() == "cpu"
    return setting == "unroll"


def jit_train_call(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int,
                   feed: data.Feed | type[data.Feed]) -> Callable:
    """`train_call` jitted over `mesh` for a feed (a `data.ResidentFeed` or `data.StreamedFeed`, or
    the class): its input placed as the feed's `sharding(mesh)`, each step's batch its `batch`; the
    train state and the metric sums replicated and donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_of = functools.partial(feed.batch, mesh=mesh)
    return jax.jit(functools.partial(train_call, config=config, num_steps=num_steps,
                                     batch_of=batch_of),
                   in_shardings=(replicated, replicated, feed.sharding(mesh), replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0, 1))


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`train_step` on a given global batch, jitted over `mesh`: the batch sharded on `data`, the
    rest replicated, the train state donated. (Runs call `jit_train_call`; the benchmark times and
    counts the FLOPs of this single step.)"""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, data.BATCH_AXIS)
    return jax.jit(functools.partial(train_step, config=config),
                   in_shardings=(replicated, sharded, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def jit_eval_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`eval_step` jitted over `mesh`: the batch sharded on `data`, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, data.BATCH_AXIS)
    return jax.jit(functools.partial(eval_step, config=config),
                   in_shardings=(replicated, sharded, replicated), out_shardings=replicated)


def evaluate(eval_step_fn: Callable, state: TrainState, split: data.Split, local_batch: int,
             mesh: Mesh, stats) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over every example of `split`, each counted exactly once (by
    `eval_step_fn`, a jitted or compiled eval step), and `examples`, the number of examples counted.

    At most two calls are in flight: each batch's sums are fetched and added on the host while the
    next batch's call runs. A loop that queued every call would deadlock XLA:CPU's runtime once a
    device has 32 calls queued (docs/operations.md#a-busy-machine)."""
    total, pending = None, None
    for batch in data.prefetch_to_mesh(data.eval_batches(split, local_batch), mesh):
        sums = eval_step_fn(state, batch, stats)
        if pending is not None:
            total = _add_fetched(total, pending)
        pending = sums
    total = _add_fetched(total, pending)
    return {**means(total), "examples": int(total["count"])}


def _add_fetched(total: dict | None, sums: Metrics) -> dict:
    """`total` + `sums`, fetched to the host (waits for the call that computes `sums`)."""
    sums = jax.device_get(sums)
    return sums if total is None else {k: total[k] + sums[k] for k in total}


# ---------------------------------------------------------------------------------------------
# 3. The run
# ---------------------------------------------------------------------------------------------
def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


# The entry of a checkpoint's description that records the pace of the run up to it.
PACE = "pace"


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
    train_key: jax.Array
    stats: dict | None
    host_stats: normalization.Stats | None = None  # `stats` in float64, as `cache_stats` writes them
    feed: data.Feed | None = None  # built by `start_feed`
    pace: progress.Pace | None = None  # the training loop's, recorded in its checkpoints
    train_calls: dict[int, Callable] = dataclasses.field(default_factory=dict)  # by steps per call
    compiled_eval: Callable | None = None  # `compiled_eval_step`'s

    def cache_stats(self, workdir: Path) -> None:
        """Caches the normalisation statistics in `workdir/normalization.json` (by process 0; a
        training run, once nothing can refuse its launch: `build_run` writes nothing)."""
        if self.host_stats is not None:
            normalization.cache(workdir / NORMALIZATION, stats_key(self.config), self.host_stats)

    def start_feed(self) -> None:
        """Decodes the training split onto the devices (or starts streaming it)."""
        self.feed = data.make_feed(self.splits["train"], self.config.dataset, self.mesh,
                                   self.config.batch_size, self.config.seed)

    def compile(self) -> float:
        """Compiles the eval step ahead of time (`compiled_eval_step`); returns the seconds it took."""
        start = time.perf_counter()
        self.compiled_eval_step()
        return time.perf_counter() - start

    def compiled_eval_step(self) -> Callable:
        """The eval step compiled for the run's batch shape (at its first use, once)."""
        if self.compiled_eval is None:
            batch = data.batch_spec(self.config.eval_batch_size, self.splits["train"].image_shape,
                                    self.mesh)
            jitted = jit_eval_step(self.config, self.mesh)
            self.compiled_eval = jitted.lower(self.state, batch, self.stats).compile()
            self._synchronised()
        return self.compiled_eval

    def compiled_train_call(self, num_steps: int) -> Callable:
        """`jit_train_call` of `num_steps` steps for the run's feed, compiled (at its first use, once
        per run): (state, sums, the feed's input, train key, stats) -> (state, sums)."""
        if num_steps not in self.train_calls:
            jitted = jit_train_call(self.config, self.mesh, num_steps, self.feed)
            self.train_calls[num_steps] = jitted.lower(
                self.state, zero_sums(self.mesh), self.feed.call_spec(num_steps), self.train_key,
                self.stats).compile()
            self._synchronised()
        return self.train_calls[num_steps]

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
        """What a checkpoint of this run records: what a resume checks (`checkpoint.run_description`)
        and, once the training loop runs, its pace so far (`progress.Pace.record`), which a resumed
        run carries on (`carried_pace`)."""
        described = checkpoint.run_description(self.config)
        return described if self.pace is None else {**described, PACE: self.pace.record()}

    def evaluate(self, split: str, ema: bool = False) -> dict[str, float]:
        """Mean loss, top-1 and top-5 of the current state on split "train", "val" or "test"; with
        `ema`, of its EMA parameters (the same compiled step: the same tree, the params swapped)."""
        state = self.state.replace(params=self.state.ema_params) if ema else self.state
        return evaluate(self.compiled_eval_step(), state, self.splits[split], self.local_eval_batch,
                        self.mesh, self.stats)

    def evaluate_logged(self, split: str) -> dict[str, float]:
        """`evaluate(split)` as logged: {"val/loss", ...}, and with EMA {"val/ema_loss", ...}."""
        metrics = _prefixed(split, self.evaluate(split))
        if has_ema(self.state):
            metrics |= {f"{split}/ema_{k}": v for k, v in self.evaluate(split, ema=True).items()
                        if k != "examples"}
        return metrics


NORMALIZATION = "normalization.json"  # in the workdir: the cached statistics of `normalization`


def stats_key(config: ml_collections.ConfigDict) -> str:
    """The entry of the run's normalisation statistics in DIR/normalization.json."""
    return normalization.cache_key(config.dataset.name, config.dataset.train_split)


def build_run(config: ml_collections.ConfigDict, mesh: Mesh, workdir: Path, *,
              abstract: bool = False) -> Run:
    """Loads the splits and builds the model, optimizer and initial state; writes nothing (the
    normalisation statistics are read from the workdir's cache, or computed: `Run.cache_stats`).
    `abstract`: the state's shapes and shardings only (`state.initial_state`), for a run whose
    state a checkpoint then replaces (--mode=eval|attend); training's is real."""
    validate.check(config)
    data.local_batch_size(config.batch_size, mesh)  # a clear error for a batch that does not divide
    check_accumulation(config.batch_size, config.accumulate_steps, mesh)
    local_eval_batch = data.local_batch_size(config.eval_batch_size, mesh)
    splits = data.load_splits(config)
    steps_per_epoch = data.steps_per_epoch(splits["train"].num_examples, config.batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"config.batch_size {config.batch_size} is larger than the training split "
                        f"({splits['train'].num_examples} examples): lower it")
    total_steps = steps_per_epoch * config.num_epochs
    data.check_num_classes(config.dataset)
    host_stats = None  # per-channel mean and std of the training split
    if config.preprocess.normalize == "standardize":
        host_stats = normalization.channel_stats(splits["train"], workdir / NORMALIZATION,
                                                 key=stats_key(config))
    stats = None if host_stats is None else {k: jnp.asarray(v, jnp.float32)
                                             for k, v in host_stats.items()}
    model, schedule, state = initial_state(config, mesh, total_steps, abstract=abstract)
    image_shape = (config.preprocess.size, config.preprocess.size, 3)
    train_key = run_keys(config.seed)[1]
    # Replicated over the mesh once, so no call re-shards them (a jitted identity: device_put cannot
    # place on other processes' devices).
    train_key, stats = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))(
        (train_key, stats))
    return Run(config, mesh, splits, local_eval_batch, steps_per_epoch, total_steps, model,
               model_stats.total_params(model, image_shape), schedule, state, train_key, stats,
               host_stats)


# ---------------------------------------------------------------------------------------------
# 4. The epoch loop
# ---------------------------------------------------------------------------------------------
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
        for n, inputs in zip(sizes, run.feed.epoch(epoch, step % run.steps_per_epoch, sizes),
                             strict=True):
            run.state, sums = run.compiled_train_call(n)(run.state, sums, inputs, run.train_key,
                                                         run.stats)
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
    """Validates, saves a checkpoint with the validation metrics (for 'best') and waits for it to be
    committed, then says where the run is, and draws the attention maps when due. Not counted in the
    training throughput."""
    config = run.config
    with pace.paused():
        val = run.evaluate_logged("val")
        log.write(step, epoch, val)
        ckpt.save(run.state, sums, run.description, metrics=val)
        ckpt.wait()  # committed before its line: a run killed after the line resumes from here
        log.info(f"epoch {epoch}/{config.num_epochs} step {step}: {log.epoch_line()} | "
                 f"{pace.median():.0f} img/s | ETA {format_duration(pace.eta(step))}")
        if config.attention_every_epochs and epoch % config.attention_every_epochs == 0:
            _draw_attention(run, log, epoch)


def _draw_attention(run: Run, log: MetricsLog, epoch: int) -> None:
    """The current model's attention on the first config.attention_images validation images
    (`inference.fixed_images`): DIR/attention/epoch_XXX.png and TensorBoard's "attention_maps" at
    the current step, by process 0. A model without an attention map is said to have none."""
    config = run.config
    if not log.is_writer:
        return
    images, labels = inference.fixed_images(run.splits["val"], config.attention_images)
    probs, attention = inference.predict(run.model, run.state.params, images, config.preprocess,
                                         run.stats)
    if attention is None:
        log.info(f"model {config.model.name!r} has no attention map: no attention/ grid "
                 "(set config.attention_every_epochs = 0)")
        return
    pixels = attention_maps.render_epoch_grid(
        images, labels, probs, attention, data.class_names(config.dataset),
        f"{config.model.name}, epoch {epoch}", log.workdir / "attention" / f"epoch_{epoch:03d}.png")
    log.write_image(int(run.state.step), "attention_maps", pixels)


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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _check_finite(metrics: dict[str, float], step: int, epoch: int) -> None:
    if not math.isfinite(metrics["loss"]):
        raise TrainingDiverged(
            f"training loss is {metrics['loss']} at step {step} (epoch {epoch}): the run diverged; "
            "lower config.optimizer.learning_rate or lengthen the warm-up")


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# 5. train_and_evaluate
# ---------------------------------------------------------------------------------------------
def _what_the_run_keeps(config, workdir, *args, **kwargs) -> str:
    """The end of a fault's line for a training run: its newest checkpoint, or none, kept."""
    return relaunch_advice(Path(workdir))


@one_line(advice=_what_the_run_keeps)
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
    """Start-up (restore or refuse, record, compile), the epochs, then the test and the results.
    Every refusal (a finished run, a checkpoint of another model, logs without a checkpoint, a bad
    config.init_from, an unreadable metrics log, another run's config) comes before the launch
    writes anything into the workdir."""
    run = build_run(config, mesh, workdir)  # writes nothing
    sums = zero_sums(mesh)
    reader = checkpoint.Checkpointer(workdir, config.checkpoint.keep, read_only=True)
    try:
        restored = reader.restore_latest(run.state, sums, run.description)
    finally:
        reader.close()
    if (finished := finished_run(workdir)) is not None:
        return finished
    if restored is None:
        refuse_to_start_over(workdir)
        if config.init_from:  # a resumed run continues from its own checkpoint instead
            run.state, warm_note = warm_start(run.state, config.init_from)
    else:
        run.state, sums = restored
        check_readable(workdir)  # the metrics log the resumed run continues
    # The last refusal (another run's config), then the first write: this launch's record.
    run_record.check_and_record(workdir, config, mesh, resuming=restored is not None)
    run.cache_stats(workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    run.start_feed()
    compile_seconds = run.compile()
    if stop.received:  # before the first step: nothing new to save, nothing written yet
        return _stopped_before_training(ckpt, stop.received, run.step, restored is not None)
    log = MetricsLog(workdir, config, resume_step=run.step if restored is not None else None)
    if restored is None and config.init_from:
        log.info(warm_note)
    _log_start(log, run, ckpt, restored is not None, compile_seconds)
    carried = carried_pace(ckpt, run.step) if restored is not None else None
    pace = run.pace = progress.Pace(run.total_steps, run.step, config.batch_size,
                                    enabled=log.is_writer, carried=carried)
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
    return _finish(run, log, ckpt, pace, pace.wall_time(), stop, hparams)


def carried_pace(ckpt: checkpoint.Checkpointer, step: int) -> dict | None:
    """The pace (`progress.Pace.record`) saved with the checkpoint at `step`, which a resumed run
    carries on; None for a checkpoint saved without one."""
    return ckpt.description(step).get(PACE)


def _stopped_before_training(ckpt: checkpoint.Checkpointer, signal_name: str, step: int,
                             resumed: bool) -> None:
    kept = f"the checkpoint at step {step} is kept" if resumed else "nothing saved"
    if jax.process_index() == 0:
        print(f"received {signal_name} before the first step: {kept}; relaunch the same command "
              "to continue", flush=True)
    ckpt.close()


def _log_start(log: MetricsLog, run: Run, ckpt: checkpoint.Checkpointer, resumed: bool,
               compile_seconds: float) -> None:
    config, k = run.config, run.config.accumulate_steps
    if resumed:
        log.info(f"resumed from the checkpoint at step {run.step} in {ckpt.directory}")
    micro = f" (accumulated over {k} micro-batches)" if k > 1 else ""
    log.info(f"{config.model.name}: {run.num_params:,} parameters; {run.steps_per_epoch} steps/"
             f"epoch x {config.num_epochs} epochs on {run.mesh.devices.size} device(s) "
             f"({jax.default_backend()}), global batch {config.batch_size}{micro}, "
             f"{config.steps_per_call} step(s) per call, training data "
             f"{'on the devices' if run.feed.resident else 'streamed'}; eval step compiled in "
             f"{compile_seconds:.1f}s")

