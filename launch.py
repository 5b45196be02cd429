r"""The one entry point of attn_jax.

    python launch.py --config=experiments/patch_convnet.py --workdir=DIR [--config.KEY=VALUE ...]
    python launch.py --config=experiments/patch_convnet.py:smoke --workdir=DIR
    python launch.py --config=experiments/patch_convnet.py --mode=summary
    python launch.py --config=experiments/patch_convnet.py --workdir=DIR --mode=attend --image=PATH
    python launch.py --config=experiments/patch_convnet.py --mode=benchmark [--workdir=DIR]
    python launch.py --config=experiments/eanet.py --sweep [--point=K | --collect | --dry_run] --workdir=DIR
"""

import os
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from attn_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/x.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "summary", "attend", "benchmark", "import", "export"],
    "train: train and evaluate (resuming from the workdir's latest checkpoint); eval: evaluate a saved "
    "checkpoint on the test split; summary: parameter table and FLOPs; attend: top-5 classes and "
    "attention map of a saved checkpoint on --image; benchmark: time the train and eval steps and the "
    "input pipeline (writes DIR/benchmark.json with --workdir); import: the official PatchConvNet "
    "weights (--weights=FILE.pth) as the workdir's checkpoint; export: a checkpoint as an official "
    "state_dict (--weights=NEW.pth).")
_WEIGHTS = flags.DEFINE_string("weights", None, "--mode=import: the official PatchConvNet state_dict to "
                               "read (.pth, read without PyTorch); --mode=export: the .pth file to write.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "--mode=eval|attend|export: 'best' (by "
                                  "validation top-1), 'latest' or a step.")
_PARAMS = flags.DEFINE_enum("params", "raw", ["raw", "ema"], "--mode=eval|attend|export: the trained "
                            "parameters ('raw') or their moving average ('ema': a run with "
                            "config.ema.decay > 0).")
_IMAGE = flags.DEFINE_multi_string("image", [], "--mode=attend: an image file (JPEG, PNG, ...; any "
                                   "size); repeat for several. Writes DIR/attend/<name>.png.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Train every point of the experiment's get_sweep() in "
                           "WORKDIR/<point>/, skipping finished points and resuming interrupted ones.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --sweep: print the number of points and one "
                             "command per point instead.")
_POINT = flags.DEFINE_string("point", None, "With --sweep: train only this point (its index in "
                             "get_sweep() or its name) in WORKDIR/<point>/, as --sweep would; one job of "
                             "an array, writing nothing outside its own directory.")
_COLLECT = flags.DEFINE_bool("collect", False, "With --sweep: train nothing; tabulate the finished points "
                             "(WORKDIR/sweep.md, sweep.csv) and list the running, failed, interrupted "
                             "and not started ones.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: host:port of process 0 (with the next two).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process' index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Multi-process: detect the job from the cluster (TPU pod, SLURM, ...).")
flags.mark_flag_as_required("config")
_SAVED = ("eval", "attend", "export")  # the modes of a saved checkpoint
_ON_DEVICES = ("train", "eval", "attend", "benchmark")  # the modes that run steps, and say on what
_MULTI_PROCESS = (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _DISTRIBUTED)


def check_flags(argv: list[str]) -> str | None:
    """The error line of flags that do not go together, or that the mode would ignore (checked
    before any work), or None. `argv`: what absl left of the command line, the program first."""
    if len(argv) > 1:
        return f"unexpected arguments {argv[1:]}: every option is a --flag"
    try:
        _CONFIG.value.get("seed")  # config_flags reports a file it could not load at the first access
    except OSError as e:
        return cli.describe_config_file_error(e)
    for check in (_sweep_flag_error, _mode_flag_error, _override_error, _output_error):
        if (line := check()) is not None:
            return line
    return None


def _doing() -> str:
    """What the command does, as its flags say it: "--mode=eval", "--sweep --collect", ..."""
    if not _SWEEP.value:
        return f"--mode={_MODE.value}"
    alternative = next((f.name for f in (_POINT, _COLLECT, _DRY_RUN) if f.present and f.value), None)
    return "--sweep" + (f" --{alternative}" if alternative else "")


def _sweep_flag_error() -> str | None:
    """--sweep and its alternatives (--point, --collect, --dry_run), and the multi-process flags,
    which only a point's own job passes on."""
    sweep, point = _SWEEP.value, _POINT.value is not None
    refusals = [  # (refused, its line): the first refused one is the error line
        (_DRY_RUN.value and not sweep, "--dry_run only applies to --sweep (it prints the sweep's "
                                       "commands): add --sweep or drop --dry_run"),
        (point and not sweep, "--point only applies to --sweep: add --sweep or drop --point"),
        (_COLLECT.value and not sweep, "--collect only applies to --sweep: add --sweep or drop --collect"),
        (sum([point, _COLLECT.value, _DRY_RUN.value]) > 1,
         "--point, --collect and --dry_run are alternatives: give one of them"),
        (sweep and _MODE.value != "train",
         f"--mode={_MODE.value} does not apply to --sweep, which trains its points: drop one of them"),
    ]
    if (line := next((line for refused, line in refusals if refused), None)) is not None:
        return line
    multi = next((f.name for f in _MULTI_PROCESS if f.present), None)
    if sweep and not point and multi is not None:
        return (f"--{multi} does not apply to {_doing()}, only to the job of one point: start "
                "--sweep --point=K with it on every process of that job, or drop it")
    return None


def _mode_flag_error() -> str | None:
    """The flags of one mode given to another, and a mode's required flags missing."""
    mode, doing = _MODE.value, _doing()
    refusals = [
        (_WEIGHTS.value is not None and mode not in ("import", "export"),
         f"--weights does not apply to {doing}, only to --mode=import|export: drop it, or use "
         "--config.init_from to start training from saved weights"),
        (_CHECKPOINT.present and mode not in _SAVED,
         f"--checkpoint does not apply to {doing}, only to --mode=eval|attend|export: give one of "
         "those modes or drop --checkpoint"),
        (_PARAMS.present and mode not in _SAVED,
         f"--params does not apply to {doing}, only to --mode=eval|attend|export: give one of those "
         "modes or drop --params"),
        (_IMAGE.present and mode != "attend",
         f"--image does not apply to {doing}, only to --mode=attend: add --mode=attend or drop --image"),
        (_WORKDIR.value is not None and mode == "summary",
         "--workdir does not apply to --mode=summary, which writes nothing: drop --workdir"),
        (mode == "import" and not _WEIGHTS.value,
         "--mode=import needs --weights=FILE.pth, the official state_dict to read"),
        (mode == "export" and not _WEIGHTS.value,
         "--mode=export needs --weights=FILE.pth, the new file to write"),
        (mode == "attend" and not _IMAGE.value, "--mode=attend needs at least one --image=PATH"),
    ]
    return next((line for refused, line in refusals if refused), None)


def _override_error() -> str | None:
    """--config.KEY=VALUE overrides that the command would ignore: the benchmark's knobs outside
    --mode=benchmark, any override of --sweep --collect (which trains nothing), a key that the
    sweep's points set themselves (theirs would win), ..."""
    overrides = list(config_flags.get_override_values(flags.FLAGS["config"]))
    mode, doing = _MODE.value, _doing()
    benchmark_knob = next((k for k in overrides if k.startswith("benchmark.")), None)
    if benchmark_knob is not None and (mode != "benchmark" or _SWEEP.value):
        return (f"--config.{benchmark_knob} does not apply to {doing}, only to --mode=benchmark "
                "(it says how the benchmark times the steps): drop it")
    if _SWEEP.value and _COLLECT.value and overrides:
        return (f"--config.{overrides[0]} does not apply to --sweep --collect, which trains nothing "
                "and tabulates the points as they ran: drop it")
    if mode == "summary" and "model.impl" in overrides:
        return ("--config.model.impl does not apply to --mode=summary, which counts the reference "
                "layers (the fast ones have the same parameters): drop it")
    if mode == "import" and "init_from" in overrides:
        return ("--config.init_from does not apply to --mode=import, whose weights come from "
                "--weights: drop it (a training launch fine-tunes from the import with it)")
    if mode == "benchmark" and _CONFIG.value.benchmark.profile_steps and not _WORKDIR.value:
        return (f"config.benchmark.profile_steps is {_CONFIG.value.benchmark.profile_steps}, but "
                "--mode=benchmark writes the trace into --workdir: add --workdir or set it to 0")
    if _SWEEP.value and overrides:
        return _overridden_by_points(overrides)
    return None


def _overridden_by_points(overrides: list[str]) -> str | None:
    """The line refusing a --config override that a sweep point sets too (the point's value would
    win), or None."""
    from attn_jax import sweep  # the experiment's get_sweep()
    from attn_jax.errors import UserError

    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        points = sweep.points(config_arg)
    except UserError as e:
        return str(e)
    for key in overrides:
        setters = [p["name"] for p in points if key in p]
        if setters:
            which = ("every point sets it" if len(setters) == len(points)
                     else f"the points {', '.join(setters)} set it")
            return (f"--config.{key} does not apply to {_doing()}: {which} (get_sweep() of "
                    f"{config_arg.partition(':')[0]}), and a point's value wins: drop it, or change "
                    "get_sweep()")
    return None


def _output_error() -> str | None:
    """The paths the command writes to, checked before any work: the workdir (made if missing,
    except where the command reads a run or a sweep from it), and --mode=export's new file."""
    mode, doing, workdir = _MODE.value, _doing(), _WORKDIR.value
    run = "the workdir of a trained or imported run"
    if _SWEEP.value:
        return cli.workdir_error(workdir, doing, holds="the workdir the points ran in"
                                 if _COLLECT.value else None)
    if mode in ("train", "import") or (mode == "benchmark" and workdir is not None):
        return cli.workdir_error(workdir, doing)
    if mode in ("eval", "attend"):  # they write their results into the run's workdir
        return cli.workdir_error(workdir, doing, holds=run)
    if mode == "export":  # reads the run, writes --weights
        return cli.workdir_error(workdir, doing, holds=run, writes=False) or _weights_error()
    return None


def _weights_error() -> str | None:
    """--mode=export's --weights: a new file in a directory this process can write in."""
    path = Path(_WEIGHTS.value)
    folder = path.absolute().parent
    if os.path.lexists(path):
        return f"--weights={path} exists: export writes a new file, choose another name"
    if not folder.is_dir():
        return f"--weights={path}: no such directory {folder}"
    if (cause := cli.cannot_write_in(folder)) is not None:
        return (f"--weights={path} cannot be written: writing in {folder} fails ({cause}): choose "
                "another --weights")
    return None


def main(argv: list[str]) -> None:
    # The console gets attn_jax's own lines: it prints its warnings and errors itself, while tfds
    # warns "OpenCV is not installed" at every launch and orbax logs each failed write with its
    # traceback (a full disk printed ~450 lines).
    logging.set_verbosity(logging.FATAL)
    if (error := check_flags(argv)) is not None:
        cli.fail(error)
    config, point = _CONFIG.value, None  # point: the sweep.Point of --sweep --point
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])  # path[:arg]
    overrides = config_flags.get_override_values(flags.FLAGS["config"])  # --config.KEY=VALUE, by key
    try:
        from attn_jax import compile_cache, distributed, jax_runtime, sweep, validate, versions
        from attn_jax.fast.threefry import use_unrolled_threefry_on_cpu

        if _POINT.value is not None:
            point = sweep.Point.select(config_arg, _POINT.value, Path(_WORKDIR.value))
            sweep.apply(config, point.overrides)  # its overrides, validated with the rest
        validate.check(config)  # every value, before any work
        versions.warn_if_untested()  # one line naming a dependency outside the tested versions
        compile_cache.enable()  # JAX's persistent compilation cache, before anything compiles
        jax_runtime.set_collective_timeouts()  # a busy machine slows a run, never aborts it
        use_unrolled_threefry_on_cpu()  # dropout masks at GPU speed on CPU: the same bits, faster
        # the modes that train; a sweep's parent only starts its points, each its own launch
        if (_MODE.value in ("train", "benchmark") and not _SWEEP.value) or point is not None:
            from attn_jax import host_memory
            from attn_jax.cpu_devices import split_host

            single = not _DISTRIBUTED.value and (_NUM_PROCESSES.value or 1) == 1
            split_host(config, single_process=single)  # before anything starts JAX's devices
            host_memory.configure(config)  # before JAX starts its threads

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               _DISTRIBUTED.value)
        if _MODE.value in _ON_DEVICES and (not _SWEEP.value or point is not None):  # not a sweep's parent
            jax_runtime.say_devices()  # "JAX 0.12.1 on gpu: 1 device (NVIDIA H100 80GB HBM3)"
        if point is not None:
            if point.start():  # False: finished already
                _train(config, point.dir, {**overrides, **point.hparams}, point)
        elif _SWEEP.value:
            extra = [f"--config.{k}={v}" for k, v in overrides.items()]
            sweep.launch(config_arg, Path(_WORKDIR.value), extra, _DRY_RUN.value, _COLLECT.value)
        elif _MODE.value == "train":
            _train(config, _WORKDIR.value, overrides)
        else:
            from attn_jax import modes  # the modes other than training

            cli.exit_on_signals(_MODE.value)  # training handles SIGTERM and SIGINT itself
            MODES[_MODE.value](modes, config)
        distributed.shutdown()
    except Exception as e:  # a bad input, a full disk: one line, not a traceback
        cli.exit_on_known_error(e, point, _training_workdir(point))
        raise


def _training_workdir(point) -> str | None:
    """The workdir of the run this launch trains (a sweep point's, or --workdir's), else None."""
    if point is not None:
        return str(point.dir)
    return _WORKDIR.value if _MODE.value == "train" and not _SWEEP.value else None


def _train(config, workdir, hparams: dict, point=None) -> None:
    """Trains in `workdir` (a sweep point's, with `point`); `hparams` for TensorBoard: the overrides."""
    from attn_jax.train import TrainingDiverged, train_and_evaluate

    try:
        train_and_evaluate(config, str(workdir), hparams=hparams)
    except TrainingDiverged as e:
        cli.fail(str(e), status=1, point=point)


def _evaluate(modes, config) -> None:
    metrics = modes.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT.value, params=_PARAMS.value)
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def _attend(modes, config) -> None:
    for result in modes.attend(config, _WORKDIR.value, _IMAGE.value, _CHECKPOINT.value,
                               params=_PARAMS.value):
        print(modes.format_result(result))


def _import(modes, config) -> None:
    path = modes.import_weights(config, _WORKDIR.value, _WEIGHTS.value)
    print(f"imported {_WEIGHTS.value} into {path}: evaluate it with --mode=eval, or fine-tune from it "
          f"with --config.init_from={_WORKDIR.value}")


def _export(modes, config) -> None:
    path = modes.export_weights(config, _WORKDIR.value, _WEIGHTS.value, _CHECKPOINT.value, _PARAMS.value)
    print(f"wrote {path}: the official PatchConvNet state_dict (torch.load, load_state_dict)")


# Every --mode but train -> what it runs, a function of attn_jax.modes (imported only for these: it
# loads the models) and of the config.
MODES = {"eval": _evaluate, "attend": _attend, "import": _import, "export": _export,
         "summary": lambda modes, config: modes.summarize(config),
         "benchmark": lambda modes, config: modes.benchmark(config, _WORKDIR.value)}

if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
