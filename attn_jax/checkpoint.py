"""Checkpoints of a run, behind one small class over orbax's `CheckpointManager`.

A checkpoint holds the train state (step, parameters, optimizer state), the training metric sums
of the log interval in progress (so a resumed run logs exactly what an uninterrupted one would), and
a JSON description of the model. orbax writes each checkpoint to a temporary directory and renames it
when complete, so a half-written checkpoint is never restored. Kept: the last `keep` checkpoints and
the best one by validation top-1.
"""

import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy

from attn_jax.errors import UserError

BEST_METRIC = "val/top1"


def model_description(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must agree between a checkpoint and the config restoring it (not `model.impl`, which
    computes the same model from the same parameters)."""
    model = {k: v for k, v in config.model.to_dict().items() if k != "impl"}
    return {"model": model, "num_classes": config.dataset.num_classes,
            "image_size": config.preprocess.size}


# The training order a checkpoint continues: `data.epoch_order` ("permutation-v1"). Runs saved before
# it (tf.data's shuffle buffer, no such entry) are refused rather than resumed in another order.
DATA_ORDER = "permutation-v1"


def run_description(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must agree to resume training from a checkpoint: the model and the data order."""
    return {**model_description(config), "data_order": DATA_ORDER}


# Model fields added after checkpoints had been saved, with the value every earlier checkpoint's model
# had: a description without the entry is read with it (untied trunk, exact GELU).
ADDED_FIELDS = {"model.tie_trunk": False, "model.gelu_approximate": False}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"dim": 64}} -> {"model.dim": 64}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _best_metric(metrics: dict) -> float:
    return metrics[BEST_METRIC]


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int, read_only: bool = False):
        """`read_only`: only restore (the directory is not created; nothing is saved)."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(keep),
            preservation_policy.BestN(get_metric_fn=_best_metric, n=1,  # the highest
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(  # best_fn makes orbax record the metrics
            preservation_policy=policy, best_fn=_best_metric, best_mode="max", create=not read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "sums": ocp.StandardCheckpointHandler(),
                    "description": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    # Saving ------------------------------------------------------------------------------------
    def save(self, state, sums, description: dict, metrics: dict[str, float] | None = None) -> None:
        """Writes a checkpoint at `state.step` (asynchronously; `wait` or `close` to finish it)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  sums=ocp.args.StandardSave(sums),
                                  description=ocp.args.JsonSave(description))
        self.manager.save(int(state.step), args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # Finding -----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def resolve(self, which: str) -> int:
        """'latest', 'best' (by validation top-1) or a step number -> a saved step."""
        steps = self.steps()
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}: train there first "
                            "(python launch.py --config=... --workdir=...)")
        if which == "latest":
            return steps[-1]
        if which == "best":
            if not any(self.manager.metrics(s) for s in steps):
                if self.imported_from(steps[-1]):  # --mode=import's one checkpoint, unrated
                    return steps[-1]
                raise UserError(f"no checkpoint in {self.directory} has a {BEST_METRIC}: "
                                "use --checkpoint=latest")
            return self.manager.best_step()
        if which.isdigit() and int(which) in steps:
            return int(which)
        raise UserError(f"--checkpoint={which}: use 'best', 'latest' or one of the saved steps "
                        f"{steps}")

    def description(self, step: int) -> dict:
        """The JSON description saved with the checkpoint at `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(
            description=ocp.args.JsonRestore()))["description"]

    def imported_from(self, step: int) -> str | None:
        """The weights file a checkpoint was imported from (--mode=import), or None."""
        return self.description(step).get("imported_from")

    # Restoring ---------------------------------------------------------------------------------
    def restore_params(self, step: int, ema: bool = False):
        """The parameters saved at `step` (with `ema`, their moving average) as a tree of NumPy
        arrays, whatever model, optimizer or config saved them (for `init_from` and `load`)."""
        if ema and not self.has_ema(step):
            raise UserError(f"the checkpoint at step {step} in {self.directory} holds no EMA of "
                            "the parameters (its run had config.ema.decay = 0): use the raw ones")
        name = "ema_params" if ema else "params"
        # Only that subtree, as host arrays: no optimizer state read, and no device layout
        # needed, so a checkpoint of 8 devices loads on 1 (orbax refuses another topology).
        shapes = self.manager.item_metadata(step)["state"][name]
        target = {name: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), shapes)}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))[name]

    def restore(self, step: int, state, sums, description: dict):
        """Restores (state, sums) saved at `step` into the shapes and shardings of the given ones.

        A checkpoint of another model or shape is a `UserError` naming what differs; nothing is
        written. Any other failure to read it propagates (see `restore_latest`).
        """
        self._check_description(step, description)
        self._check_ema(step, state)
        self._check_shapes(step, state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (state, sums))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract[0]), sums=ocp.args.StandardRestore(abstract[1])))
        return restored["state"], restored["sums"]

    def restore_latest(self, state, sums, description: dict):
        """The newest readable checkpoint as (state, sums), or None when there is none.

        A checkpoint that cannot be read is skipped with a warning naming it, in favour of the one
        before; if none can be read the run stops: it never silently starts afresh over saved work.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                return self.restore(step, state, sums, description)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001  (orbax, tensorstore and OS errors alike)
                moved = self._set_aside(step)
                message = (f"checkpoint {self.directory / str(step)} is unreadable "
                           f"({type(e).__name__}); moved it to {moved} and trying the one before")
                logging.warning("%s: %s", message, e)
                print(f"warning: {message}", flush=True)
        if steps:
            raise UserError(f"no readable checkpoint in {self.directory} (steps {steps}): "
                            "move the directory away to start afresh")
        return None

    def _set_aside(self, step: int) -> Path:
        """Moves an unreadable checkpoint out of orbax's way (kept for inspection, not deleted)."""
        target = self.directory.parent / "checkpoints_unreadable" / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(self.directory / str(step), target)
        self.manager.reload()
        return target

    def _check_description(self, step: int, description: dict) -> None:
        saved, expected = _flatten(self.description(step)), _flatten(description)
        for key, value in ADDED_FIELDS.items():
            if key in expected:
                saved.setdefault(key, value)
        sections = {k.split(".")[0] for k in expected}  # evaluation does not check the data order
        differ = [k for k in sorted(saved.keys() | expected.keys())
                  if k.split(".")[0] in sections and saved.get(k) != expected.get(k)]
        if differ:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {expected.get(k)!r}"
                                for k in differ)
            raise UserError(f"the checkpoint at step {step} in {self.directory} was made by a "
                            f"different model or data order ({details}): use another --workdir "
                            "or the matching config")

    def has_ema(self, step: int) -> bool:
        """Whether the checkpoint at `step` holds an EMA of the parameters (`ema_params`, saved by
        a run with config.ema.decay > 0)."""
        return "ema_params" in self.manager.item_metadata(step)["state"]

    def _check_ema(self, step: int, state) -> None:
        """A checkpoint with an EMA restores into a state with one, and one without into one
        without (refused before orbax, which would fail as if the checkpoint were unreadable)."""
        saved, expected = self.has_ema(step), hasattr(state, "ema_params")
        if saved != expected:
            raise UserError(f"the checkpoint at step {step} in {self.directory} was saved "
                            f"{'with' if saved else 'without'} an EMA of the parameters and this "
                            f"config has {'none' if saved else 'one'}: set config.ema.decay as the "
                            "run that saved it did")

    def _check_shapes(self, step: int, state) -> None:
        saved = self.manager.item_metadata(step)["state"]
        expected = jax.tree_util.tree_flatten_with_path(state.params)[0]
        saved_params = dict(jax.tree_util.tree_flatten_with_path(saved["params"])[0])
        mismatched = []
        for path, leaf in expected:
            meta = saved_params.pop(path, None)
            if meta is None or tuple(meta.shape) != tuple(leaf.shape):
                shape = "missing" if meta is None else tuple(meta.shape)
                mismatched.append(f"{jax.tree_util.keystr(path)} {shape} vs {tuple(leaf.shape)}")
        mismatched += [f"{jax.tree_util.keystr(p)} unexpected" for p in saved_params]
        if mismatched:
            shown = ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
            raise UserError(f"the checkpoint at step {step} in {self.directory} does not fit this "
                            f"model ({len(mismatched)} mismatched: {shown}): use another --workdir "
                            "or the matching config")


def locate(path: str | Path, which: str = "best") -> tuple[Path, int]:
    """A saved checkpoint named by the user: a workdir (its checkpoint `which`: "best", "latest" or a
    step) or one checkpoint's directory, DIR/checkpoints/STEP -> (the workdir, the step)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
        return path.parent.parent, int(path.name)
    if not (path / "checkpoints").is_dir():
        raise UserError(f"{path} is neither a workdir with checkpoints nor a checkpoint "
                        "(DIR/checkpoints/STEP): give one of them")
    ckpt = Checkpointer(path, keep=1, read_only=True)
    try:
        return path, ckpt.resolve(which)
    finally:
        ckpt.close()
