"""The optimizer of a run (config.optimizer): the learning-rate schedule, AdamW or LAMB with a
weight-decay mask and optional gradient clipping, and gradient accumulation over micro-batches
(config.accumulate_steps) with the check that a batch splits into them. Reading order:
`create_learning_rate_fn`, `create_optimizer`, `adamw`, `decay_mask`, `accumulated_gradients`,
`micro_batches`, `check_accumulation`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from attn_jax.errors import UserError


def create_learning_rate_fn(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """config.optimizer.schedule: "constant", or "warmup_cosine" (linear from 0 over the first
    `warmup_fraction` of the steps, then cosine to 0 at `total_steps`, as in the tutorial).
    The schedule maps an optimizer update's number (a scalar, 0 for the first) to its rate."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    warmup = int(total_steps * cfg.warmup_fraction)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def create_optimizer(cfg: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
    """config.optimizer.name: "adamw" (`adamw`) or "lamb" (optax.lamb: You et al. 2020, the
    PatchConvNet paper's optimizer), both with the same weight-decay mask and schedule; with
    `clip_grad_norm` > 0 the gradients are first clipped to that global norm
    (optax.clip_by_global_norm, as timm's --clip-grad with --clip-mode norm). Off, nothing is
    chained: the optimizer state is the one of runs saved before these options."""
    mask = functools.partial(decay_mask, exclude=cfg.weight_decay_exclude)
    if cfg.name == "lamb":  # the decay is scaled by the learning rate and the trust ratio
        tx = optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=mask)
    else:
        tx = adamw(cfg, schedule, mask)
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
    if cfg.weight_decay_mode == "per_step":
        return optax.chain(
            optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.scale_by_learning_rate(schedule, flip_sign=False),
            optax.add_decayed_weights(cfg.weight_decay, mask=mask),
            optax.scale(-1.0))
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=mask)


def decay_mask(params, exclude: Sequence[str], *, exclude_vectors: bool = False):
    """Which parameters get weight decay: a pytree of bools shaped like `params` (a mask for
    `optax.adamw(..., mask=...)`), False for every leaf whose path has a component named in
    `exclude` (a module or parameter name, e.g. ("cls_token", "layer_scale")), True otherwise.

    With `exclude_vectors=True`, leaves with fewer than 2 dimensions (biases, LayerNorm scales and
    offsets, layer-scales) are excluded too, as timm's `create_optimizer` does for the official
    DeiT / CaiT / PatchConvNet training (it adds the model's `no_weight_decay()` names to them).
    Works on arrays and `jax.ShapeDtypeStruct`s alike.
    """
    excluded = set(exclude)

    def keep(path, leaf) -> bool:
        names = {str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path}
        if names & excluded:
            return False
        return not (exclude_vectors and len(leaf.shape) < 2)

    return jax.tree_util.tree_map_with_path(keep, params)


def accumulated_gradients(grad_fn: Callable, params, batch: dict, key: jax.Array,
                          k: int) -> tuple[Any, Any]:
    """`grad_fn(params, batch, key)` -> (gradients, metric sums), with config.accumulate_steps = k.

    With k > 1 the batch of B examples is split into k micro-batches of B / k (`micro_batches`),
    whose gradients a `lax.scan` sums inside the one jitted step, then divides by k: the mean of
    equal-sized micro-batches' means is the batch's mean, so one optimizer update sees the gradient
    of the whole batch, and activations are held for B / k examples only. Chosen over
    optax.MultiSteps, which would make every micro-batch a call that counts as a step: here
    `state.step`, the schedule, the logged step and the checkpoints all count optimizer updates, the
    batch still means the examples per update, and no half-accumulated gradient ever needs saving,
    so resume stays exact. Micro-batch j draws its dropout from fold_in(key, j) (k = 1 keeps the key
    itself); the augmentation was drawn for the whole batch before the split.
    """
    if k == 1:
        return grad_fn(params, batch, key)

    def micro_step(total, xs):
        j, micro = xs
        step = grad_fn(params, micro, jax.random.fold_in(key, j))
        return jax.tree.map(jnp.add, total, step), None

    micros = micro_batches(batch, k)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micros), key)
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


def check_accumulation(batch_size: int, k: int, mesh: Mesh) -> None:
    """A `UserError` unless the global batch splits into k micro-batches spread evenly over the
    mesh's devices (`micro_batches`)."""
    devices = mesh.devices.size
    if batch_size % (k * devices):
        raise UserError(f"config.batch_size {batch_size} does not split into "
                        f"config.accumulate_steps={k} micro-batches over {devices} devices: use a "
                        f"multiple of {k * devices}")
