"""launch.py's command line: its flags, and the checks that refuse, before any work, flags that do
not go together or that the command would ignore.

Importing this module defines the flags on absl's FLAGS; launch.py reads them (`launch_flags.MODE.value`)
and calls `check_flags` on what absl left of the command line before it does anything.
"""

import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from attn_jax import cli

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/x.py[:arg].",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "summary", "attend", "benchmark", "import", "export"],
    "train: train and evaluate (resuming from the workdir's latest checkpoint); eval: evaluate a saved "
    "checkpoint on the test split; summary: parameter table and FLOPs; attend: top-5 classes and "
    "attention map of a saved checkpoint on --image; benchmark: time the train and eval steps and the "
    "input pipeline (writes DIR/benchmark.json with --workdir); import: the official PatchConvNet "
    "weights (--weights=FILE.pth) as the workdir's checkpoint; export: a checkpoint as an official "
    "state_dict (--weights=NEW.pth).")
WEIGHTS = flags.DEFINE_string("weights", None, "--mode=import: the official PatchConvNet state_dict to "
                              "read (.pth, read without PyTorch); --mode=export: the .pth file to write.")
CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "--mode=eval|attend|export: 'best' (by "
                                 "validation top-1), 'latest' or a step.")
PARAMS = flags.DEFINE_enum("params", "raw", ["raw", "ema"], "--mode=eval|attend|export: the trained "
                           "parameters ('raw') or their moving average ('ema': a run with "
                           "config.ema.decay > 0).")
IMAGE = flags.DEFINE_multi_string("image", [], "--mode=attend: an image file (JPEG, PNG, ...; any "
                                  "size); repeat for several. Writes DIR/attend/<name>.png.")
SWEEP = flags.DEFINE_bool("sweep", False, "Train every point of the experiment's get_sweep() in "
                          "WORKDIR/<point>/, skipping finished points and resuming interrupted ones.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "With --sweep: print the number of points and one "
                            "command per point instead.")
POINT = flags.DEFINE_string("point", None, "With --sweep: train only this point (its index in "
                            "get_sweep() or its name) in WORKDIR/<point>/, as --sweep would; one job of "
                            "an array, writing nothing outside its own directory.")
COLLECT = flags.DEFINE_bool("collect", False, "With --sweep: train nothing; tabulate the finished points "
                            "(WORKDIR/sweep.md, sweep.csv) and list the running, failed, interrupted "
                            "and not started ones.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "Multi-process: host:port of process 0 (with the next two).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process' index.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                "Multi-process: detect the job from the cluster (TPU pod, SLURM, ...).")
flags.mark_flag_as_required("config")
_SAVED = ("eval", "attend", "export")  # the modes of a saved checkpoint
_MULTI_PROCESS = (COORDINATOR, NUM_PROCESSES, PROCESS_ID, DISTRIBUTED)


def check_flags(argv: list[str]) -> str | None:
    """The error line of flags that do not go together, or that the mode would ignore (checked
    before any work), or None. `argv`: what absl left of the command line, the program first."""
    if len(argv) > 1:
        return f"unexpected arguments {argv[1:]}: every option is a --flag"
    try:
        CONFIG.value.get("seed")  # config_flags reports a file it could not load at the first access
    except OSError as e:
        return cli.describe_config_file_error(e)
    for check in (_sweep_flag_error, _mode_flag_error, _override_error, _output_error):
        if (line := check()) is not None:
            return line
    return None


def _doing() -> str:
    """What the command does, as its flags say it: "--mode=eval", "--sweep --collect", ..."""
    if not SWEEP.value:
        return f"--mode={MODE.value}"
    alternative = next((f.name for f in (POINT, COLLECT, DRY_RUN) if f.present and f.value), None)
    return "--sweep" + (f" --{alternative}" if alternative else "")


def _sweep_flag_error() -> str | None:
    """--sweep and its alternatives (--point, --collect, --dry_run), and the multi-process flags,
    which only a point's own job passes on."""
    sweep, point = SWEEP.value, POINT.value is not None
    refusals = [  # (refused, its line): the first refused one is the error line
        (DRY_RUN.value and not sweep, "--dry_run only applies to --sweep (it prints the sweep's "
                                       "commands): add --sweep or drop --dry_run"),
        (point and not sweep, "--point only applies to --sweep: add --sweep or drop --point"),
        (COLLECT.value and not sweep, "--collect only applies to --sweep: add --sweep or drop --collect"),
        (sum([point, COLLECT.value, DRY_RUN.value]) > 1,
         "--point, --collect and --dry_run are alternatives: give one of them"),
        (sweep and MODE.value != "train",
         f"--mode={MODE.value} does not apply to --sweep, which trains its points: drop one of them"),
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
    mode, doing = MODE.value, _doing()
    refusals = [
        (WEIGHTS.value is not None and mode not in ("import", "export"),
         f"--weights does not apply to {doing}, only to --mode=import|export: drop it, or use "
         "--config.init_from to start training from saved weights"),
        (CHECKPOINT.present and mode not in _SAVED,
         f"--checkpoint does not apply to {doing}, only to --mode=eval|attend|export: give one of "
         "those modes or drop --checkpoint"),
        (PARAMS.present and mode not in _SAVED,
         f"--params does not apply to {doing}, only to --mode=eval|attend|export: give one of those "
         "modes or drop --params"),
        (IMAGE.present and mode != "attend",
         f"--image does not apply to {doing}, only to --mode=attend: add --mode=attend or drop --image"),
        (WORKDIR.value is not None and mode == "summary",
         "--workdir does not apply to --mode=summary, which writes nothing: drop --workdir"),
        (mode == "import" and not WEIGHTS.value,
         "--mode=import needs --weights=FILE.pth, the official state_dict to read"),
        (mode == "export" and not WEIGHTS.value,
         "--mode=export needs --weights=FILE.pth, the new file to write"),
        (mode == "attend" and not IMAGE.value, "--mode=attend needs at least one --image=PATH"),
    ]
    return next((line for refused, line in refusals if refused), None)


def _override_error() -> str | None:
    """--config.KEY=VALUE overrides that the command would ignore: the benchmark's knobs outside
    --mode=benchmark, any override of --sweep --collect (which trains nothing), a key that the
    sweep's points set themselves (theirs would win), ..."""
    overrides = list(config_flags.get_override_values(flags.FLAGS["config"]))
    mode, doing = MODE.value, _doing()
    benchmark_knob = next((k for k in overrides if k.startswith("benchmark.")), None)
    if benchmark_knob is not None and (mode != "benchmark" or SWEEP.value):
        return (f"--config.{benchmark_knob} does not apply to {doing}, only to --mode=benchmark "
                "(it says how the benchmark times the steps): drop it")
    if SWEEP.value and COLLECT.value and overrides:
        return (f"--config.{overrides[0]} does not apply to --sweep --collect, which trains nothing "
                "and tabulates the points as they ran: drop it")
    if mode == "summary" and "model.impl" in overrides:
        return ("--config.model.impl does not apply to --mode=summary, which counts the reference "
                "layers (the fast ones have the same parameters): drop it")
    if mode == "import" and "init_from" in overrides:
        return ("--config.init_from does not apply to --mode=import, whose weights come from "
                "--weights: drop it (a training launch fine-tunes from the import with it)")
    if mode == "benchmark" and CONFIG.value.benchmark.profile_steps and not WORKDIR.value:
        return (f"config.benchmark.profile_steps is {CONFIG.value.benchmark.profile_steps}, but "
                "--mode=benchmark writes the trace into --workdir: add --workdir or set it to 0")
    if SWEEP.value and overrides:
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
    mode, doing, workdir = MODE.value, _doing(), WORKDIR.value
    run = "the workdir of a trained or imported run"
    if SWEEP.value:
        return cli.workdir_error(workdir, doing, holds="the workdir the points ran in"
                                 if COLLECT.value else None)
    if mode in ("train", "import") or (mode == "benchmark" and workdir is not None):
        return cli.workdir_error(workdir, doing)
    if mode in ("eval", "attend"):  # they write their results into the run's workdir
        return cli.workdir_error(workdir, doing, holds=run)
    if mode == "export":  # reads the run, writes --weights
        return cli.workdir_error(workdir, doing, holds=run, writes=False) or _weights_error()
    return None


def _weights_error() -> str | None:
    """--mode=export's --weights: a new file in a directory this process can write in."""
    path = Path(WEIGHTS.value)
    folder = path.absolute().parent
    if os.path.lexists(path):
        return f"--weights={path} exists: export writes a new file, choose another name"
    if not folder.is_dir():
        return f"--weights={path}: no such directory {folder}"
    if (cause := cli.cannot_write_in(folder)) is not None:
        return (f"--weights={path} cannot be written: writing in {folder} fails ({cause}): choose "
                "another --weights")
    return None
