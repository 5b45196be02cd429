"""Starting a train state from saved parameters rather than its initialisation: config.init_from
(`warm_start`), and --mode=import (`warm_state` of the mapped official weights). Reading order:
`warm_start`, `merge_params`, `warm_state`.
"""

import jax
import numpy as np

from attn_jax import checkpoint
from attn_jax.errors import UserError
from attn_jax.state import TrainState, has_ema, with_ema

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


def merge_params(params, saved, source: str):
    """(`params` with every leaf replaced by `saved`'s at the same path, the head's leaves of
    another shape kept; the paths kept). Any other missing, extra or misshapen leaf is one
    `UserError` naming it. `params` may be abstract (ShapeDtypeStructs): only a kept head then
    stays abstract."""
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


def warm_state(state: TrainState, params) -> TrainState:
    """A fresh train state of `state`'s kind starting from `params` (host or device arrays, the
    tree of `state.params`): step 0, its optimizer's initial state, its EMA (where it keeps one) at
    `params`, replicated as `state` is. `state` is a fresh state, real or abstract
    (`state.initial_state(..., abstract=True)`): only its tree, shardings, model and optimizer are
    read, so nothing of it needs initialising."""

    def fresh(params):
        new = TrainState.create(apply_fn=state.apply_fn, params=params, tx=state.tx)
        return with_ema(new, has_ema(state))

    # Jitted (device_put cannot place on other processes' devices); its outputs are buffers of
    # their own, as a train step that donates both the parameters and the EMA needs.
    return jax.jit(fresh, out_shardings=state.step.sharding)(params)
