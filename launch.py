r"""The one entry point of attn_jax.

    python launch.py --config=experiments/patch_convnet.py --workdir=DIR [--config.KEY=VALUE ...]
    python launch.py --config=experiments/patch_convnet.py:smoke --workdir=DIR
    python launch.py --config=experiments/patch_convnet.py --mode=summary
    python launch.py --config=experiments/patch_convnet.py --workdir=DIR --mode=attend --image=PATH
    python launch.py --config=experiments/patch_convnet.py --mode=benchmark [--workdir=DIR]
    python launch.py --config=experiments/eanet.py --sweep [--point=K | --collect | --dry_run] --workdir=DIR
"""

import os
import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from attn_jax.errors import UserError, describe_environment_error, environment_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/x.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "summary", "attend", "benchmark",
                                           "import", "export"],
                          "train: train and evaluate (resuming from the workdir's latest checkpoint); "
                          "eval: evaluate a saved checkpoint on the test split; "
                          "summary: parameter table and FLOPs; "
                          "attend: top-5 classes and attention map of a saved checkpoint on --image; "
                          "benchmark: time the train and eval steps and the input pipeline "
                          "(writes DIR/benchmark.json with --workdir); "
                          "import: the official PatchConvNet weights (--weights=FILE.pth) as the "
                          "workdir's checkpoint; export: a checkpoint as an official state_dict "
                          "(--weights=NEW.pth).")
_WEIGHTS = flags.DEFINE_string("weights", None, "--mode=import: the official PatchConvNet "
                               "state_dict to read (.pth, read without PyTorch); --mode=export: "
                               "the .pth file to write.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best",
                                  "--mode=eval|attend|export: 'best' (by validation top-1), "
                                  "'latest' or a step.")
_PARAMS = flags.DEFINE_enum("params", "raw", ["raw", "ema"],
                           "--mode=eval|attend|export: the trained parameters ('raw') or their moving "
                           "average ('ema': a run with config.ema.decay > 0).")
_IMAGE = flags.DEFINE_multi_string("image", [], "--mode=attend: an image file (JPEG, PNG, ...; any "
                                   "size); repeat for several. Writes DIR/attend/<name>.png.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Train every point of the experiment's get_sweep() in "
                           "WORKDIR/<point>/, skipping finished points and resuming interrupted ones.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --sweep: print the number of points and one "
                             "command per point instead.")
_POINT = flags.DEFINE_string("point", None, "With --sweep: train only this point (its index in "
                             "get_sweep() or its name) in WORKDIR/<point>/, as --sweep would; one "
                             "job of an array, writing nothing outside its own directory.")
_COLLECT = flags.DEFINE_bool("collect", False, "With --sweep: train nothing; tabulate the finished "
                             "points (WORKDIR/sweep.md, sweep.csv) and list the running, failed, "
                             "interrupted and not started ones.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: host:port of process 0 (with the next two).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process' index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Multi-process: detect the job from the cluster (TPU pod, SLURM, ...).")
flags.mark_flag_as_required("config")


# --sweep --point: the point's directory, where a failure of this launch is recorded (failed.json).
_point_dir = None


def fail(message: str, status: int = 2, record: bool = True):
    """Prints one error line and exits non-zero (recording it in a sweep point's directory)."""
    if record:
        _record_point_failure(message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _record_point_failure(message: str) -> None:
    """`--sweep --point`: the error line into DIR/<point>/failed.json for `--collect` (process 0)."""
    if _point_dir is None:
        return
    import contextlib

    import jax

    from attn_jax import sweep

    if jax.process_index() == 0:
        with contextlib.suppress(OSError):  # a full disk, say: the console still has the line
            sweep.record_failure(_point_dir, message)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (a misspelled --config key among them) are one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).strip().splitlines()[0])
    except OSError as e:  # the config file, when config_flags loads it while parsing
        fail(_describe_config_file_error(e))
    except SyntaxError as e:
        fail(f"--config: the experiment file {e.filename} has a syntax error at line {e.lineno}: "
             f"{e.msg}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        fail(_describe_override_error(argv, e))
    return []  # unreachable


def _describe_config_file_error(error: OSError) -> str:
    missing = re.search(r"Attempted.*?:\s*(\S+)\s*\[Errno 2\]", str(error), re.S)
    if missing:
        return f"--config: no such experiment file {missing.group(1)!r}"
    return f"--config: cannot load the experiment file ({str(error).splitlines()[0]})"


def _describe_override_error(argv: list[str], error: Exception) -> str:
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
    suggestion = re.search(r'Did you mean "([\w.]+)"', text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((o for o in overrides if o.split(".")[-1] in text), None)
    if flag and suggestion:
        return f"{flag}: no such config key (did you mean {suggestion.group(1)!r}?)"
    if flag:
        return f"{flag}: no such config key or a bad value ({text})"
    return f"bad --config: {text}"


def _require_workdir() -> str:
    """--workdir, which must be (or become) a writable directory."""
    import os
    from pathlib import Path

    if not _WORKDIR.value:
        fail(f"--workdir is required for --mode={_MODE.value}")
    workdir = Path(_WORKDIR.value)
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir={workdir} is a file, not a directory: choose another --workdir")
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--workdir={workdir}: {existing} is not writable: choose another --workdir")
    return _WORKDIR.value


def _sweep() -> None:
    from pathlib import Path

    from attn_jax import sweep

    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = [f"--config.{k}={v}" for k, v in
                 config_flags.get_override_values(flags.FLAGS["config"]).items()]
    workdir = Path(_require_workdir())
    if _DRY_RUN.value:
        lines = sweep.commands(config_arg, workdir, overrides)
        print(f"# {len(lines)} points: --point=0..{len(lines) - 1}", *lines, sep="\n")
    elif _COLLECT.value:
        sweep.collect(config_arg, workdir)
    else:
        sweep.run(config_arg, workdir, overrides)


def _sweep_point(config):
    """--sweep --point=K: the point's overrides set on `config`; returns (point, its workdir)."""
    global _point_dir
    from pathlib import Path

    from attn_jax import sweep

    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    point = sweep.select(config_arg, _POINT.value)
    _point_dir = Path(_require_workdir()) / point["name"]
    sweep.apply(config, point)
    return point, _point_dir


def _train_point(config, point: dict, point_dir) -> None:
    """Trains one sweep point in its directory, as the sequential --sweep does."""
    import jax

    from attn_jax import sweep

    if (point_dir / "summary.json").exists():
        print(f"sweep: {point['name']} is finished, skipping", flush=True)
        return
    if jax.process_index() == 0:
        state = "resuming" if (point_dir / "checkpoints").exists() else "starting"
        print(f"sweep: {state} {point['name']}", flush=True)
        sweep.clear_failure(point_dir)
    _train(config, str(point_dir), _hparams(point))


def _hparams(point: dict | None = None) -> dict:
    """The run's hyperparameters for TensorBoard: its config overrides, then its sweep point's."""
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    return {**overrides, **{k: v for k, v in (point or {}).items() if k != "name"}}


def _train(config, workdir: str, hparams: dict) -> None:
    from attn_jax.train import TrainingDiverged, train_and_evaluate

    try:
        train_and_evaluate(config, workdir, hparams=hparams)
    except TrainingDiverged as e:
        fail(str(e), status=1)


def main(argv: list[str]) -> None:
    # The console gets attn_jax's own lines: it prints its warnings and errors itself, while tfds
    # warns "OpenCV is not installed" at every launch and orbax logs each failed write with its
    # traceback (a full disk printed ~450 lines).
    logging.set_verbosity(logging.FATAL)
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: every option is a --flag")
    try:
        config = _CONFIG.value
        config.get("seed")  # config_flags reports a file it could not load at the first access
    except OSError as e:
        fail(_describe_config_file_error(e))
    if _DRY_RUN.value and not _SWEEP.value:
        fail("--dry_run only applies to --sweep (it prints the sweep's commands): add --sweep or "
             "drop --dry_run")
    for name, given in (("--point", _POINT.value is not None), ("--collect", _COLLECT.value)):
        if given and not _SWEEP.value:
            fail(f"{name} only applies to --sweep: add --sweep or drop {name}")
    if sum([_POINT.value is not None, _COLLECT.value, _DRY_RUN.value]) > 1:
        fail("--point, --collect and --dry_run are alternatives: give one of them")
    if _WEIGHTS.value is not None and _MODE.value not in ("import", "export"):
        fail("--weights only applies to --mode=import|export: drop it, or use --config.init_from "
             "to start training from saved weights")
    if _MODE.value in ("train", "eval", "attend", "import", "export") or _SWEEP.value:
        _require_workdir()  # before any work
    try:
        from attn_jax import distributed, validate
        from attn_jax.fast.threefry import use_unrolled_threefry_on_cpu

        point = None
        if _SWEEP.value and _POINT.value is not None:
            point, point_dir = _sweep_point(config)  # its overrides, validated with the rest
        validate.check(config)  # every value, before any work
        use_unrolled_threefry_on_cpu()  # dropout masks at GPU speed on CPU: the same bits, faster
        # the modes that train; a sweep's parent only starts its points, each its own launch
        if (_MODE.value in ("train", "benchmark") and not _SWEEP.value) or _POINT.value is not None:
            from attn_jax import host_memory
            from attn_jax.cpu_devices import split_host

            single = not _DISTRIBUTED.value and (_NUM_PROCESSES.value or 1) == 1
            split_host(config, single_process=single)  # before anything starts JAX's devices
            host_memory.configure(config)  # before JAX starts its threads

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               _DISTRIBUTED.value)
        if point is not None:
            _train_point(config, point, point_dir)
        else:
            _run_mode(config)
        distributed.shutdown()
    except UserError as e:
        from attn_jax.workdir_lock import InUse

        fail(str(e), record=not isinstance(e, InUse))  # a refused launch is no failure of the point
    except Exception as e:  # a full disk, a deleted or read-only folder: one line, not a traceback
        if (cause := environment_error(e)) is None:
            _record_point_failure(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
            raise
        _record_point_failure(describe_environment_error(cause))
        print(f"error: {describe_environment_error(cause)}", file=sys.stderr, flush=True)
        os._exit(1)  # skip the teardown of orbax's failed writer threads, which prints tracebacks


def _stop_on_signal(signum, frame) -> None:
    """--mode=eval|attend|summary|benchmark: a SIGTERM or SIGINT stops the mode with one line; its
    outputs are written whole at its end (atomic renames), so nothing half-written is left."""
    del frame
    print(f"received {signal.Signals(signum).name} during --mode={_MODE.value}: stopped before "
          "its results were written; nothing else changed", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def _run_mode(config) -> None:
    """Runs the --mode (or --sweep) the flags ask for."""
    if _MODE.value != "train" and not _SWEEP.value:  # training handles signals itself
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_on_signal)
    if _SWEEP.value:
        _sweep()
        return
    from attn_jax import modes  # the modes other than training

    if _MODE.value == "summary":
        modes.summarize(config)
    elif _MODE.value == "eval":
        metrics = modes.evaluate_checkpoint(config, _require_workdir(), _CHECKPOINT.value,
                                           params=_PARAMS.value)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in metrics.items()))
    elif _MODE.value == "attend":
        for result in modes.attend(config, _require_workdir(), _IMAGE.value, _CHECKPOINT.value,
                                   params=_PARAMS.value):
            print(modes.format_result(result))
    elif _MODE.value == "import":
        path = modes.import_weights(config, _require_workdir(), _WEIGHTS.value)
        print(f"imported {_WEIGHTS.value} into {path}: evaluate it with --mode=eval, or fine-tune "
              f"from it with --config.init_from={_require_workdir()}")
    elif _MODE.value == "export":
        path = modes.export_weights(config, _require_workdir(), _WEIGHTS.value, _CHECKPOINT.value,
                                    _PARAMS.value)
        print(f"wrote {path}: the official PatchConvNet state_dict (torch.load, load_state_dict)")
    elif _MODE.value == "benchmark":
        modes.benchmark(config, _WORKDIR.value)
    elif _MODE.value == "train":
        _train(config, _require_workdir(), _hparams())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
