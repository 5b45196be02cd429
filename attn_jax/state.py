"""The train state: parameters, optimizer state and step, and with config.ema an exponential moving
average of the parameters. Reading order: `initial_state` (the one builder, for training, the
benchmark, --mode=import|eval|attend and `attn_jax.load`), `create_train_state`, the EMA
(`EmaTrainState`, `has_ema`, `with_ema`, `ema_decay`, `update_ema`).

A state is replicated over a 1-D mesh named `data`. Built abstractly (`abstract=True`), its leaves
are `jax.ShapeDtypeStruct`s carrying those shardings: the tree a checkpoint restores into, or
parameters are mapped into, without initialising anything.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import optimizer, registry

TrainState = train_state.TrainState


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run: the two halves of key(config.seed)."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    return init_key, train_key


def initial_state(config: ml_collections.ConfigDict, mesh: Mesh, total_steps: int, *,
                  impl: str | None = None,
                  abstract: bool = False) -> tuple[nn.Module, optax.Schedule, TrainState]:
    """(model, learning-rate schedule over `total_steps`, initial train state) of `config`, no data
    needed: the model from the layers `impl` chooses (default config.model.impl), the optimizer
    of config.optimizer, an EMA where config.ema.decay > 0, replicated over `mesh`.

    `abstract`: the state by `jax.eval_shape` (ShapeDtypeStructs with their shardings, nothing
    computed), for what replaces every value anyway: a checkpoint's restore, imported weights."""
    model = registry.create_model(config, config.dataset.num_classes, impl=impl)
    image_shape = (config.preprocess.size, config.preprocess.size, 3)
    schedule = optimizer.create_learning_rate_fn(config.optimizer, total_steps)
    tx = optimizer.create_optimizer(config.optimizer, schedule)
    state = create_train_state(model, tx, run_keys(config.seed)[0], image_shape, mesh,
                               ema=config.ema.decay > 0, abstract=abstract)
    return model, schedule, state


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, int, int], mesh: Mesh, *, ema: bool = False,
                       abstract: bool = False) -> TrainState:
    """Initialises parameters (`model.init` on one [1, *image_shape] image) and optimizer state,
    replicated over `mesh`; with `ema`, an `EmaTrainState` whose average starts at the initial
    parameters (as timm's ModelEmaV2). `abstract`: only traced (`jax.eval_shape` of the jitted
    initialisation, whose leaves keep their shardings)."""

    def init(key):
        images = jnp.zeros((1, *image_shape), jnp.float32)
        params = model.init(key, images, train=False)["params"]
        if ema:
            return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                        ema_params=params)
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    init = jax.jit(init, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return jax.eval_shape(init, key) if abstract else init(key)


# ---------------------------------------------------------------------------------------------
# The exponential moving average (config.ema)
# ---------------------------------------------------------------------------------------------
class EmaTrainState(TrainState):
    """A train state that also keeps an exponential moving average of the parameters
    (config.ema.decay > 0), updated by `update_ema` after every optimizer update. Without EMA a run
    keeps the plain `TrainState`, so its tree, and its checkpoints, are the ones of earlier runs."""

    ema_params: Any


def has_ema(state: TrainState) -> bool:
    return isinstance(state, EmaTrainState)


def with_ema(state: TrainState, ema: bool) -> TrainState:
    """`state` with an EMA slot (a copy of the parameters, to restore a saved average into) or
    without one: the tree of a checkpoint saved with or without EMA. Real or abstract alike."""
    if ema == has_ema(state):
        return state
    fields = {"step": state.step, "apply_fn": state.apply_fn, "params": state.params,
              "tx": state.tx, "opt_state": state.opt_state}
    return EmaTrainState(**fields, ema_params=state.params) if ema else TrainState(**fields)


def ema_decay(step: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The EMA's decay (a float32 scalar) for optimizer update number `step` (0 for the first):
    config.ema.decay, or with config.ema.warmup min(decay, (1 + step) / (10 + step)),
    tf.train.ExponentialMovingAverage's `num_updates` warm-up (0.1 at the first update, 0.9 at the
    80th, 0.99 at the 890th), so the average forgets the initial parameters early in training.
    timm's ModelEmaV2 (DeiT) has none."""
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
