"""The optimizer of a run (config.optimizer): the learning-rate schedule, AdamW or LAMB with a
weight-decay mask and optional gradient clipping, and the check that a batch splits into
micro-batches (config.accumulate_steps). Reading order: `create_learning_rate_fn`,
`create_optimizer`, `adamw`, `decay_mask`, `check_accumulation`.
"""

import functools
from collections.abc import Callable, Sequence

import jax
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
    mask = functools.partial(decay_mask, exclude=cfg.weight_decay_exclude)
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


def check_accumulation(batch_size: int, k: int, mesh: Mesh) -> None:
    """A `UserError` unless the global batch splits into k micro-batches spread evenly over the
    mesh's devices (`train.micro_batches`)."""
    devices = mesh.devices.size
    if batch_size % (k * devices):
        raise UserError(f"config.batch_size {batch_size} does not split into "
                        f"config.accumulate_steps={k} micro-batches over {devices} devices: use a "
                        f"multiple of {k * devices}")
