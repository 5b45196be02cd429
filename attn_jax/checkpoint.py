"""Checkpoints of a run, behind one small class over orbax's `CheckpointManager`.

A checkpoint holds the train state (step, parameters, optimizer state), the training metric sums
of the log interval in progress (so a resumed run logs exactly what an uninterrupted one would), and
a JSON description of the model. orbax writes each checkpoint to a temporary directory and renames it
when complete, so a half-written checkpoint is never restored. Kept: the last `keep` checkpoints and
the best one by validation top-1.

A checkpoint damaged afterwards (a file cut short, overwritten or removed) never blocks the others:
one orbax could not even list is hidden from it (`damage`, `_StepNames`), one it cannot read is an
`UnreadableCheckpoint` naming it; training sets either aside and resumes from the newest intact
one, evaluating it is one line.
"""

import contextlib
import errno
import inspect
import itertools
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from attn_jax.errors import RunFault, UserError, environment_error, reason

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


def damage(step_dir: Path) -> str | None:
    """Why the checkpoint in `step_dir` (DIR/checkpoints/STEP) cannot even be listed by orbax, or
    None: it holds no train state (an empty or partly copied folder), or its `metrics` file, which
    orbax reads for every checkpoint when it opens the folder, is not what a save writes there."""
    if not (step_dir / "state").is_dir():
        return "it holds no state/ folder"
    metrics = step_dir / "metrics" / "metrics"
    if not metrics.exists():  # saved without validation metrics
        return None
    try:
        saved = json.loads(metrics.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return f"metrics/metrics is {reason(e)}"
    if saved is not None and not (isinstance(saved, dict)
                                  and isinstance(saved.get(BEST_METRIC), int | float)):
        return f"metrics/metrics holds no {BEST_METRIC}"
    return None


def _messages(error: BaseException) -> str:
    """The messages of `error` and of the errors it was raised from or while handling."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


class _StepNames:
    """orbax's standard step folders (an `ocp.step.NameFormat`) less the `hidden` steps: damaged
    checkpoints that would stop orbax from listing the folder at all."""

    def __init__(self, hidden: dict[int, str]):
        self._standard = ocp.step.standard_name_format()
        self._hidden = hidden  # the Checkpointer's own dict: a step set aside is shown again

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def find_all(self, base_path):
        return [m for m in self._standard.find_all(base_path) if m.step not in self._hidden]

    def find_step(self, base_path, step: int):
        if step in self._hidden:
            raise ValueError(f"the checkpoint at step {step} is damaged: {self._hidden[step]}")
        return self._standard.find_step(base_path, step)


class UnreadableCheckpoint(RunFault):
    """A saved checkpoint that cannot be read: damaged (a file cut short, overwritten, removed)."""

    def __init__(self, directory: Path, step: int, why: str, others: list[int]):
        self.step, self.why = step, why
        fix = (f"choose another of its checkpoints (steps {others})" if others else
               "no other checkpoint of the run is readable: put back a good copy, or train afresh "
               "in another --workdir")
        super().__init__(f"checkpoint {directory / str(step)} is unreadable ({why}): {fix}")


def _quiet_abandoned_orbax_work(hook):
    """`hook` (sys.unraisablehook) less the echoes of a failed orbax read or write: when one of its
    reads or writes fails, orbax raises that error and abandons the others it had started beside
    it. Each coroutine of them that failed too prints its own error when it is collected, and each
    tensorstore operation still running calls back into the asyncio loop orbax has closed
    meanwhile ("Event loop is closed"): tracebacks by the hundred that say nothing the raised error
    does not."""
    orbax_code = str(Path(ocp.__file__).parent)

    def filtered(unraisable) -> None:
        value, source = unraisable.exc_value, unraisable.object
        closed_loop = (source is None and isinstance(value, RuntimeError)
                       and str(value) == "Event loop is closed")
        orbax_coroutine = inspect.iscoroutine(source) and source.cr_code.co_filename.startswith(
            orbax_code)
        if not (closed_loop or orbax_coroutine):
            hook(unraisable)
    return filtered


sys.unraisablehook = _quiet_abandoned_orbax_work(sys.unraisablehook)


class Checkpointer:
    """Saves and restores a run's checkpoints in `workdir/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int, read_only: bool = False):
        """`read_only`: only restore (the directory is not created; nothing is saved)."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.read_only = read_only
        # {step: why} of the checkpoints orbax could not list (`damage`), hidden from it
        self.damaged = {step: why for step, why in
                        ((int(p.name), damage(p)) for p in self._step_folders()) if why}
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.LatestN(keep),
            preservation_policy.BestN(get_metric_fn=_best_metric, n=1,  # the highest
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(  # best_fn makes orbax record the metrics
            preservation_policy=policy, best_fn=_best_metric, best_mode="max", create=not read_only,
            step_name_format=_StepNames(self.damaged))
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "sums": ocp.StandardCheckpointHandler(),
                    "description": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def _step_folders(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()]

    # Saving ------------------------------------------------------------------------------------
    def save(self, state, sums, description: dict, metrics: dict[str, float] | None = None) -> None:
        """Writes a checkpoint at `state.step` (asynchronously; `wait` or `close` to finish it)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  sums=ocp.args.StandardSave(sums),
                                  description=ocp.args.JsonSave(description))
        with self._writing():
            self.manager.save(int(state.step), args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self.manager.close()

    @contextlib.contextmanager
    def _writing(self):
        """A failed save whose cause is the checkpoints folder itself, removed (in part) or made
        read-only under the run, is one `RunFault` or `PermissionError` naming the folder: orbax
        reports it in many ways, as whichever of its writes failed first."""
        try:
            yield
        except Exception as e:
            fault = environment_error(e)
            if self.read_only or (fault is not None and fault.errno != errno.ENOENT):
                raise  # a full disk, say: its own line
            if (removed := self._removed(e)) is not None:
                raise RunFault(f"{removed} while the run was saving: put back what was removed and "
                               "relaunch the same command to resume, or train afresh in another "
                               "--workdir") from e
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(self.directory)) from e
            raise

    def _removed(self, error: BaseException) -> str | None:
        """What of the checkpoints folder was removed under the run, or None: the folder, saved
        checkpoints, or the one being saved: every folder of orbax's newest step, or one in the
        folder that `error` names (a path in orbax's messages ends at a space, quote or colon)."""
        if not self.directory.is_dir():
            return f"{self.directory} was removed"
        steps = sorted(self.manager.all_steps())
        if gone := [s for s in steps[:-1] if not (self.directory / str(s)).is_dir()]:
            return f"the checkpoints of steps {gone} in {self.directory} were removed"
        named = [name.rstrip(".") for name in re.findall(
            re.escape(str(self.directory)) + r"/([^\s\"':,]+)", _messages(error))]
        if (steps and not any(self.directory.glob(f"{steps[-1]}*"))  # STEP or STEP.<orbax's tmp>
                or any(not (self.directory / name).exists() for name in named)):
            return f"the checkpoint being saved in {self.directory} was removed"
        return None

    # Finding -----------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The saved steps orbax lists: every checkpoint but the `damaged` ones."""
        return sorted(self.manager.all_steps())

    def resolve(self, which: str | int) -> int:
        """'latest', 'best' (by validation top-1) or a step number (an int or its digits) -> a
        saved step. A damaged checkpoint passed over for 'latest' or 'best' is named in a warning;
        asked for by its step, it is an `UnreadableCheckpoint`."""
        if isinstance(which, bool) or not isinstance(which, str | int):
            raise UserError(f"checkpoint {which!r}: use 'best', 'latest' or a step number")
        which, steps = str(which), self.steps()
        if which.isdigit() and int(which) in self.damaged:
            raise self._unreadable(int(which), self.damaged[int(which)])
        if not steps and self.damaged:
            raise RunFault(f"no readable checkpoint in {self.directory}: {self._damage_list()}")
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}: train there first "
                            "(python launch.py --config=... --workdir=...)")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            step = self._best(steps)
        elif which.isdigit() and int(which) in steps:
            return int(which)
        else:
            raise UserError(f"--checkpoint={which}: use 'best', 'latest' or one of the saved steps "
                            f"{steps}")
        passed_over = {s: why for s, why in self.damaged.items() if which == "best" or s > step}
        if passed_over and jax.process_index() == 0:
            print(f"warning: passed over the unreadable {self._damage_list(passed_over)}; "
                  f"--checkpoint={which} is step {step}", flush=True)
        return step

    def _best(self, steps: list[int]) -> int:
        if not any(self.manager.metrics(s) for s in steps):
            if self.imported_from(steps[-1]):  # --mode=import's one checkpoint, unrated
                return steps[-1]
            raise UserError(f"no checkpoint in {self.directory} has a {BEST_METRIC}: "
                            "use --checkpoint=latest")
        return self.manager.best_step()

    def _damage_list(self, damaged: dict[int, str] | None = None) -> str:
        damaged = self.damaged if damaged is None else damaged
        return "; ".join(f"checkpoint {self.directory / str(s)} ({why})"
                         for s, why in sorted(damaged.items()))

    def _unreadable(self, step: int, why: str) -> UnreadableCheckpoint:
        return UnreadableCheckpoint(self.directory, step, why,
                                    [s for s in self.steps() if s != step])

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Any failure to read the checkpoint at `step` (orbax, tensorstore, JSON and OS errors
        alike) is an `UnreadableCheckpoint` saying why; a `UserError` (another model) stays one."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(step, reason(e)) from e

    def description(self, step: int) -> dict:
        """The JSON description saved with the checkpoint at `step`."""
        with self._reading(step):
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
        with self._reading(step):
            # Only that subtree, as host arrays: no optimizer state read, and no device layout
            # needed, so a checkpoint of 8 devices loads on 1 (orbax refuses another topology).
            shapes = self.manager.item_metadata(step)["state"][name]
            target = {name: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), shapes)}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            with ocp.PyTreeCheckpointer() as reader:
                return reader.restore(self.directory / str(step) / "state",
                                      args=ocp.args.PyTreeRestore(item=target,
                                                                  restore_args=restore_args,
                                                                  partial_restore=True))[name]

    def restore(self, step: int, state, sums, description: dict):
        """Restores (state, sums) saved at `step` into the shapes and shardings of the given ones.

        A checkpoint of another model or shape is a `UserError` naming what differs; nothing is
        written. One that cannot be read is an `UnreadableCheckpoint` (see `restore_latest`).
        """
        with self._reading(step):
            self._check_description(step, description)
            self._check_ema(step, state)
            self._check_shapes(step, state)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (state, sums))
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract[0]),
                sums=ocp.args.StandardRestore(abstract[1])))
        return restored["state"], restored["sums"]

    def restore_latest(self, state, sums, description: dict):
        """The newest readable checkpoint as (state, sums), or None when there is none.

        Every damaged checkpoint, and one that cannot be read when its turn comes, is set aside
        (`_set_aside`) with a warning naming it and why, in favour of the one before; if none can
        be read the run stops: it never silently starts afresh over saved work.
        """
        everything = sorted([*self.steps(), *self.damaged])
        for step, why in sorted(self.damaged.items()):
            self._set_aside(step, why)
        for step in reversed(self.steps()):
            try:
                return self.restore(step, state, sums, description)
            except UnreadableCheckpoint as e:
                self._set_aside(step, e.why)
        if everything:
            raise RunFault(f"no readable checkpoint in {self.directory} (steps {everything}, set "
                           f"aside in {self._aside}): move the workdir away to start afresh")
        return None

    @property
    def _aside(self) -> Path:
        return self.directory.parent / "checkpoints_unreadable"

    def _set_aside(self, step: int, why: str) -> None:
        """Moves an unreadable checkpoint out of orbax's way, kept for inspection (never deleted,
        nor put over one set aside before: a second step 40 goes to 40.2), and says so."""
        source = self.directory / str(step)
        target = next(self._aside / name for name in
                      itertools.chain([str(step)], (f"{step}.{n}" for n in itertools.count(2)))
                      if not (self._aside / name).exists())
        if jax.process_index() == 0:
            self._aside.mkdir(exist_ok=True)
            shutil.move(source, target)
            message = f"checkpoint {source} is unreadable ({why}); moved it to {target}"
            logging.warning("%s", message)
            print(f"warning: {message}", flush=True)
        if jax.process_count() > 1:  # moved before any process lists the folder again
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.damaged.pop(step, None)  # its step may be saved again, and listed
        self.manager.reload()

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
        with self._reading(step):
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


def locate(path: str | Path, which: str | int = "best") -> tuple[Path, int]:
    """A saved checkpoint named by the user: a workdir (its checkpoint `which`: "best", "latest" or a
    step) or one checkpoint's directory, DIR/checkpoints/STEP -> (the workdir, the step), a step
    that can be listed (`Checkpointer.resolve`)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
        path, which = path.parent.parent, int(path.name)
    elif not (path / "checkpoints").is_dir():
        raise UserError(f"{path} is neither a workdir with checkpoints nor a checkpoint "
                        "(DIR/checkpoints/STEP): give one of them")
    ckpt = Checkpointer(path, keep=1, read_only=True)
    try:
        return path, ckpt.resolve(which)
    finally:
        ckpt.close()
