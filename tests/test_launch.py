"""launch.py as a user runs it: flags that do not go together, one-line errors with a non-zero status
(recorded by a sweep point), the summary mode, and every mode run where TensorFlow is not installed."""

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from conftest import ROOT
from PIL import Image

from attn_jax import cli, launch_flags, sweep  # launch_flags defines launch.py's flags on absl's FLAGS
from attn_jax.errors import RunFault, UserError
from attn_jax.workdir_lock import InUse

EXPERIMENT = f"--config={ROOT / 'experiments' / 'eanet.py'}"  # it has a get_sweep()


def _flag_error(*args: str) -> str | None:
    """launch_flags.check_flags on the command line `args`, parsed in this process (config_flags reads
    the --config.KEY overrides from sys.argv)."""
    argv = ["launch.py", EXPERIMENT, *args]
    saved = sys.argv
    try:
        sys.argv = argv
        return launch_flags.check_flags(flags.FLAGS(argv))
    finally:
        sys.argv = saved
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # the overrides' flags, defined by this parse


def _with_paths(tmp_path, *texts):
    """`texts` with the placeholders {W} (a workdir to be), {RUN} (an existing workdir), {FILE} (a
    file), {NEW} (a file to be) and {EXPERIMENT} (the experiment file) filled in under `tmp_path`."""
    (tmp_path / "file").write_text("")
    (tmp_path / "trained").mkdir(exist_ok=True)
    paths = {"W": tmp_path / "run", "RUN": tmp_path / "trained", "FILE": tmp_path / "file",
             "NEW": tmp_path / "new.pth", "EXPERIMENT": EXPERIMENT.partition("=")[2]}
    return [text.format(**paths) for text in texts]


@pytest.mark.parametrize("args, line", [
    (["--workdir={W}", "extra"], "unexpected arguments ['extra']: every option is a --flag"),
    # --sweep and its alternatives
    (["--workdir={W}", "--dry_run"], "--dry_run only applies to --sweep (it prints the sweep's commands): "
                                   "add --sweep or drop --dry_run"),
    (["--workdir={W}", "--point=0"], "--point only applies to --sweep: add --sweep or drop --point"),
    (["--workdir={W}", "--collect"], "--collect only applies to --sweep: add --sweep or drop --collect"),
    (["--workdir={W}", "--sweep", "--point=0", "--dry_run"],
     "--point, --collect and --dry_run are alternatives: give one of them"),
    (["--workdir={W}", "--sweep", "--mode=eval"],
     "--mode=eval does not apply to --sweep, which trains its points: drop one of them"),
    (["--workdir={W}", "--sweep", "--distributed"],
     "--distributed does not apply to --sweep, only to the job of one point: start --sweep --point=K "
     "with it on every process of that job, or drop it"),
    (["--workdir={W}", "--sweep", "--dry_run", "--num_processes=2"],
     "--num_processes does not apply to --sweep --dry_run, only to the job of one point: start "
     "--sweep --point=K with it on every process of that job, or drop it"),
    # the flags of one mode given to another, a mode's flags missing
    (["--workdir={W}", "--weights=x.pth"], "--weights does not apply to --mode=train, only to "
     "--mode=import|export: drop it, or use --config.init_from to start training from saved weights"),
    (["--workdir={W}", "--checkpoint=latest"], "--checkpoint does not apply to --mode=train, only to "
     "--mode=eval|attend|export: give one of those modes or drop --checkpoint"),
    (["--workdir={W}", "--sweep", "--checkpoint=best"], "--checkpoint does not apply to --sweep, only to "
     "--mode=eval|attend|export: give one of those modes or drop --checkpoint"),
    (["--mode=benchmark", "--params=ema"], "--params does not apply to --mode=benchmark, only to "
     "--mode=eval|attend|export: give one of those modes or drop --params"),
    (["--mode=summary", "--image=x.png"],
     "--image does not apply to --mode=summary, only to --mode=attend: add --mode=attend or drop --image"),
    (["--mode=summary", "--workdir={W}"],
     "--workdir does not apply to --mode=summary, which writes nothing: drop --workdir"),
    (["--mode=import", "--workdir={W}"], "--mode=import needs --weights=FILE.pth, the official "
                                       "state_dict to read"),
    (["--mode=export", "--workdir={RUN}"], "--mode=export needs --weights=FILE.pth, the new file to write"),
    (["--mode=attend", "--workdir={RUN}"], "--mode=attend needs at least one --image=PATH"),
    # --config overrides the command would ignore
    (["--workdir={W}", "--config.benchmark.repeats=2"], "--config.benchmark.repeats does not apply to "
     "--mode=train, only to --mode=benchmark (it says how the benchmark times the steps): drop it"),
    (["--mode=summary", "--config.benchmark.warmup=0"], "--config.benchmark.warmup does not apply to "
     "--mode=summary, only to --mode=benchmark (it says how the benchmark times the steps): drop it"),
    (["--mode=summary", "--config.model.impl=fast"], "--config.model.impl does not apply to "
     "--mode=summary, which counts the reference layers (the fast ones have the same parameters): "
     "drop it"),
    (["--mode=import", "--weights=x.pth", "--workdir={W}", "--config.init_from={RUN}"],
     "--config.init_from does not apply to --mode=import, whose weights come from --weights: drop it "
     "(a training launch fine-tunes from the import with it)"),
    (["--mode=benchmark", "--config.benchmark.profile_steps=2"], "config.benchmark.profile_steps is 2, "
     "but --mode=benchmark writes the trace into --workdir: add --workdir or set it to 0"),
    (["--sweep", "--collect", "--workdir={RUN}", "--config.num_epochs=2"],
     "--config.num_epochs does not apply to --sweep --collect, which trains nothing and tabulates the "
     "points as they ran: drop it"),
    (["--sweep", "--workdir={W}", "--config.seed=5"], "--config.seed does not apply to --sweep: every "
     "point sets it (get_sweep() of {EXPERIMENT}), and a point's value wins: drop it, or change "
     "get_sweep()"),
    (["--sweep", "--point=1", "--workdir={W}", "--config.model.attention=self"],
     "--config.model.attention does not apply to --sweep --point: every point sets it (get_sweep() "
     "of {EXPERIMENT}), and a point's value wins: drop it, or change get_sweep()"),
    # the paths it writes, before any work
    (["--mode=eval"], "--workdir is required for --mode=eval"),
    (["--sweep", "--collect"], "--workdir is required for --sweep --collect"),
    (["--sweep", "--collect", "--workdir={W}"],
     "--workdir={W} does not exist: --sweep --collect needs the workdir the points ran in"),
    (["--mode=eval", "--workdir={W}"],
     "--workdir={W} does not exist: --mode=eval needs the workdir of a trained or imported run"),
    (["--mode=import", "--weights=x.pth", "--workdir={FILE}"],
     "--workdir={FILE} is a file, not a directory: choose another --workdir"),
    (["--mode=benchmark", "--workdir={FILE}"],
     "--workdir={FILE} is a file, not a directory: choose another --workdir"),
    (["--workdir={FILE}/run"], "--workdir={FILE}/run: {FILE} is a file, not a directory: choose another "
                             "--workdir"),
    (["--mode=export", "--workdir={RUN}", "--weights={FILE}"],
     "--weights={FILE} exists: export writes a new file, choose another name"),
])
def test_flags_that_do_not_go_together_are_one_line(tmp_path, args, line):
    args = _with_paths(tmp_path, *args)
    assert _flag_error(*args) == _with_paths(tmp_path, line)[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")
@pytest.mark.parametrize("args, start", [
    (["--workdir=/proc/attn_jax_run"], "--workdir=/proc/attn_jax_run cannot be created: writing in "
                                       "/proc fails ("),
    (["--mode=benchmark", "--workdir=/proc/attn_jax_run"],
     "--workdir=/proc/attn_jax_run cannot be created: writing in /proc fails ("),
    (["--mode=export", "--workdir={RUN}", "--weights=/proc/attn_jax.pth"],
     "--weights=/proc/attn_jax.pth cannot be written: writing in /proc fails ("),
])
def test_a_path_that_can_never_be_written_is_refused_up_front(tmp_path, args, start):
    """Tried, not deduced from permissions: /proc takes no new folder, even from root."""
    line = _flag_error(*_with_paths(tmp_path, *args))
    assert re.fullmatch(re.escape(start) + r"[\w ]+\): choose another --(workdir|weights)", line), line


@pytest.mark.parametrize("args", [
    ["--workdir={W}"], ["--mode=summary"], ["--mode=benchmark"], ["--mode=benchmark", "--workdir={W}"],
    ["--mode=eval", "--checkpoint=latest", "--params=ema", "--workdir={RUN}"],
    ["--mode=attend", "--image=a.png", "--image=b.png", "--checkpoint=20", "--workdir={RUN}"],
    ["--mode=export", "--weights={NEW}", "--params=ema", "--workdir={RUN}"],
    ["--mode=benchmark", "--config.benchmark.repeats=2"],
    ["--sweep", "--mode=train", "--point=self-seed1", "--workdir={W}", "--config.num_epochs=2"],
    ["--sweep", "--dry_run", "--workdir={W}"], ["--sweep", "--collect", "--workdir={RUN}"],
    ["--sweep", "--point=0", "--distributed", "--workdir={W}"],
])
def test_flags_that_go_together_pass(tmp_path, args):
    assert _flag_error(*_with_paths(tmp_path, *args)) is None
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "trained"]  # the write tests left nothing


def test_a_failed_point_launch_records_its_line_but_a_refused_one_does_not(tmp_path, capsys):
    point = sweep.Point({"name": "a", "seed": 1}, tmp_path / "a")
    with pytest.raises(SystemExit) as exited:
        cli.exit_on_known_error(UserError("config.seed is -1: use an integer >= 0"), point)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: config.seed is -1: use an integer >= 0\n"
    assert sweep.state(point.dir) == ("failed", "config.seed is -1: use an integer >= 0")
    with pytest.raises(SystemExit):  # another launch trains the point: this one changes nothing
        cli.exit_on_known_error(InUse("the workdir is in use"), point)
    assert sweep.state(point.dir) == ("failed", "config.seed is -1: use an integer >= 0")
    assert cli.exit_on_known_error(RuntimeError("a bug\nin the end"), point) is None  # re-raised
    assert sweep.state(point.dir) == ("failed", "RuntimeError: in the end")


def test_a_fault_of_the_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """A RunFault (a damaged checkpoint, say) exits with status 1, recorded by its point; the exit
    skips the teardown of orbax's writer threads (os._exit), whose tracebacks would follow."""
    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    point = sweep.Point({"name": "a", "seed": 1}, tmp_path / "a")
    line = "checkpoint /runs/a/checkpoints/30 is unreadable (OUT_OF_RANGE: ...): choose another"
    with pytest.raises(SystemExit) as exited:
        cli.exit_on_known_error(RunFault(line), point)
    assert exited.value.code == 1
    assert capsys.readouterr().err == f"error: {line}\n"
    assert sweep.state(point.dir) == ("failed", line)


@pytest.mark.parametrize("mode, said", [
    ("eval", "stopped before its results were written; nothing else changed"),
    ("attend", "stopped; each image it wrote is whole; nothing else changed"),  # one by one
    ("import", "stopped: relaunch the same command, which finishes the import or finds it finished"),
])
def test_a_signal_stops_a_mode_with_one_line_saying_what_it_wrote(mode, said, capsys, monkeypatch):
    """At once, without unwinding (an exception from the handler could land in a library's
    callback, which would print it and carry on)."""
    def exit_now(status):
        raise SystemExit(status)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    try:
        cli.exit_on_signals(mode)
        with pytest.raises(SystemExit) as exited:
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exited.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == f"received SIGINT during --mode={mode}: {said}\n"


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_summary_ends_with_the_tutorial_parameter_count():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total params: 1,436,426"  # the tutorial's shared trunk block
    assert any(line.startswith("forward FLOPs per image") for line in lines)


@pytest.mark.slow
def test_misspelled_config_key_is_one_line_and_exit_2():
    result = _launch("--config=experiments/patch_convnet.py", "--mode=summary",
                     "--config.model.dimm=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.model.dimm: no such config key (did you mean 'dim'?)")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, line", [
    (["--config=experiments/nope.py", "--workdir=WORKDIR"],
     "error: --config: no such experiment file 'experiments/nope.py'"),
    (["--config=BROKEN", "--workdir=WORKDIR"],
     "error: --config: the experiment file BROKEN has a syntax error at line 1: invalid syntax"),
    (["--config=experiments/patch_convnet.py", "--workdir=FILE"],
     "error: --workdir=FILE is a file, not a directory: choose another --workdir"),
    (["--config=experiments/patch_convnet.py", "--workdir=WORKDIR", "--dry_run"],
     "error: --dry_run only applies to --sweep (it prints the sweep's commands): add --sweep or "
     "drop --dry_run"),
    (["--config=experiments/patch_convnet.py", "--workdir=WORKDIR", "--checkpoint=latest"],
     "error: --checkpoint does not apply to --mode=train, only to --mode=eval|attend|export: give one "
     "of those modes or drop --checkpoint"),
    (["--config=experiments/patch_convnet.py:smoke", "--mode=benchmark", "--workdir=FILE"],
     "error: --workdir=FILE is a file, not a directory: choose another --workdir"),
])
def test_bad_command_lines_are_one_line_before_any_work(tmp_path, args, line):
    paths = {"WORKDIR": str(tmp_path / "run"), "FILE": str(tmp_path / "a_file"),
             "BROKEN": str(tmp_path / "broken.py")}
    (tmp_path / "a_file").write_text("results\n")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    for name, path in paths.items():
        args, line = [a.replace(name, path) for a in args], line.replace(name, path)
    result = _launch(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "run").exists() and (tmp_path / "a_file").read_text() == "results\n"


@pytest.mark.slow
def test_sigterm_during_benchmark_mode_is_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke", "--mode=benchmark",
         f"--workdir={tmp_path / 'bench'}", "--config.benchmark.repeats=1000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until it is timing
        if line.startswith("train step compiled"):
            break
    process.send_signal(subprocess.signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + 15
    assert err.strip().splitlines() == [
        "received SIGTERM during --mode=benchmark: stopped before its results were written; nothing "
        "else changed"]
    assert not (tmp_path / "bench" / "benchmark.json").exists()


def _launch_in(args, env, timeout=300):
    """launch.py with `args`, in the environment `env`."""
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_training_runs_without_tensorflow(tmp_path, digits_data_dir, digits_tfrecord_dir,
                                          no_tensorflow_env):
    """No module that training, evaluation, attend or summary imports imports TensorFlow: a short
    run with its attention maps, its evaluation, --mode=attend and --mode=summary, each in a process
    where TensorFlow is not installed."""
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=no_tensorflow_env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    small = ["--config.dataset.train_split=train[:256]", "--config.num_epochs=1",
             "--config.model.dim=16", "--config.steps_per_call=4", "--config.attention_every_epochs=1"]
    common = ["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'run'}",
              f"--config.dataset.data_dir={digits_data_dir}", *small]
    trained = _launch_in(common, no_tensorflow_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "4 step(s) per call, training data on the devices" in trained.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "attention" / "epoch_001.png").exists()
    evaluated = _launch_in([*common, "--mode=eval", "--checkpoint=latest"], no_tensorflow_env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test/top1" in evaluated.stdout
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    attended = _launch_in([*common, "--mode=attend", f"--image={image}", "--checkpoint=latest"],
                          no_tensorflow_env)
    assert attended.returncode == 0, attended.stderr[-3000:]
    assert (tmp_path / "run" / "attend" / "digit.png").exists()
    summary = _launch_in([*[a for a in common if not a.startswith("--workdir=")], "--mode=summary"],
                         no_tensorflow_env)
    assert summary.returncode == 0 and "total params:" in summary.stdout, summary.stderr[-3000:]

    # A dataset prepared as TFRecord: one line saying how to convert it, exit status 2.
    refused = _launch_in(["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'tf'}",
                          f"--config.dataset.data_dir={digits_tfrecord_dir}"], no_tensorflow_env)
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "prepared as TFRecord" in error[0]
    assert "python -m attn_jax.convert_dataset --name=sklearn_digits" in error[0]
