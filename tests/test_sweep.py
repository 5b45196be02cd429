"""attn_jax/sweep.py through launch.py --sweep: a point's start and its recorded failure, a dry run,
a sweep that skips, resumes and reports, points run as concurrent jobs (--point) gathered by
--collect, and each run's HParams summary."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT, SMALL_RUN, preempted_when, small_digits_config

from attn_jax import sweep, train
from attn_jax.errors import RunFault

SWEEP_EXPERIMENT = """
from attn_jax.experiment import load_module


def get_config(arg=None):
    config = load_module({base!r}).get_config("smoke")
    config.dataset.data_dir = {data_dir!r}
    for key, value in {small!r}.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    config.optimizer.schedule = "constant"
    return config


def get_sweep(arg=None):
    return [{{"name": f"dim{{d}}-seed{{s}}", "model.dim": d, "seed": s}}
            for d in (8, 16) for s in (0, 1)][:{count}]
"""


def _write_sweep_experiment(path, data_dir, count):
    path.write_text(textwrap.dedent(SWEEP_EXPERIMENT.format(
        base=str(ROOT / "experiments" / "patch_convnet.py"), data_dir=str(data_dir),
        small={**SMALL_RUN, "log_every_steps": 5}, count=count)))


def test_a_point_starts_resumes_or_is_skipped_and_forgets_its_last_failure(tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text('def get_sweep(arg=None):\n'
                          '    return [{"name": "a", "seed": 1}, {"name": "b", "model.dim": 8}]\n')
    point = sweep.Point.select(str(experiment), "1", tmp_path / "sweep")
    assert point.name == "b" and point.dir == tmp_path / "sweep" / "b"
    assert point.hparams == {"model.dim": 8}
    assert point.start()
    point.record_failure("config.model.dim is 8: use a multiple of 3")
    assert sweep.state(point.dir) == ("failed", "config.model.dim is 8: use a multiple of 3")
    (point.dir / "checkpoints").mkdir()
    assert point.start()
    assert sweep.state(point.dir) == ("not started", "")  # no failure, no checkpoint step yet
    (point.dir / "summary.json").write_text("{}")
    assert not point.start()
    assert capsys.readouterr().out.splitlines() == [
        "sweep: starting b", "sweep: resuming b", "sweep: b is finished, skipping"]


@pytest.mark.parametrize("content, why", [
    ('{"test/top1": 0.9', "not valid JSON"),
    ('[0.9]', "it holds an array, not a JSON object"),
    ('{"test/top1": "0.9"}', "test/top1 is '0.9', not a number"),
])
def test_a_damaged_point_summary_is_one_line_naming_it(tmp_path, content, why):
    """--collect's report reads every finished point's summary.json: one damaged since it was
    written (cut short, overwritten, edited) is one line naming it, not a traceback."""
    experiment = tmp_path / "exp.py"
    experiment.write_text('def get_sweep(arg=None):\n'
                          '    return [{"name": "a", "seed": 1}, {"name": "b", "seed": 2}]\n')
    for name in ("a", "b"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "summary.json").write_text('{"test/top1": 0.5}')
    (tmp_path / "sweep" / "b" / "summary.json").write_text(content)
    with pytest.raises(RunFault) as raised:
        sweep.write_report(str(experiment), tmp_path / "sweep")
    assert str(raised.value).startswith(f"{tmp_path / 'sweep' / 'b' / 'summary.json'} is damaged (")
    assert why in str(raised.value) and str(raised.value).endswith(
        "move it away and relaunch --point=b to write them again")


@pytest.mark.slow
def test_sweep_dry_run_prints_one_command_per_point(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 4)
    result = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                             "--dry_run", f"--workdir={tmp_path / 'sweep'}", "--config.num_epochs=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, *lines = result.stdout.strip().splitlines()
    assert count == "# 4 points: --point=0..3"  # sizes an array job
    assert len(lines) == 4
    assert f"--workdir={tmp_path / 'sweep' / 'dim16-seed1'}" in lines[3]
    assert all("--config.num_epochs=3" in line and "--config.seed=" in line for line in lines)
    assert not (tmp_path / "sweep").exists()  # a dry run trains nothing


@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_reports(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    workdir = tmp_path / "sweep"
    # Point 0 was preempted (SIGTERM) after one of its two epochs: its checkpoint is there.
    first = sweep.points(str(experiment))[0]
    config = small_digits_config(digits_data_dir, {**SMALL_RUN, "model.dim": 8, "seed": 0,
                                                   "num_epochs": 2, "log_every_steps": 5})
    config.optimizer.schedule = "constant"
    with preempted_when(lambda step, scalars: "val/loss" in scalars):  # the end of epoch 1
        assert train.train_and_evaluate(config, str(workdir / first["name"])) is None

    result = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                             f"--workdir={workdir}", "--config.num_epochs=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sweep: resuming dim8-seed0" in result.stdout
    assert "resumed from the checkpoint at step 10" in result.stdout
    assert "sweep: starting dim8-seed1" in result.stdout
    rows = (workdir / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("name,group,val/top1")
    report = (workdir / "sweep.md").read_text()
    assert "| model.dim=8 | 2 |" in report and "±" in report

    again = subprocess.run([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                            f"--workdir={workdir}", "--config.num_epochs=2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.stdout.count("is finished, skipping") == 2


# A stand-in for a point's launch: it records its process id, then waits; on SIGTERM it "saves"
# (writes which signal came) and exits 0, as a training run does.
STAND_IN_POINT = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (out / "saved").write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
out.mkdir(parents=True)
(out / "pid").write_text(str(os.getpid()))
time.sleep(120)
"""


def test_a_signal_to_a_sequential_sweep_stops_its_point_then_the_sweep(tmp_path, monkeypatch,
                                                                       capsys):
    """SIGTERM to a sweep running its points in turn reaches the point training, which saves and
    stops; the sweep waits for it, says which point stopped and how to resume, exits 128 + 15, and
    starts no further point: no point is left training without its sweep."""
    experiment, workdir = tmp_path / "exp.py", tmp_path / "sweep"
    experiment.write_text('def get_sweep(arg=None):\n    return [{"name": "a"}, {"name": "b"}]\n')
    monkeypatch.setattr(sweep, "point_command", lambda config_arg, workdir, point, extra: [
        sys.executable, "-c", STAND_IN_POINT, str(workdir / point["name"])])

    def preempt():  # as a scheduler does, once point a runs
        while not (workdir / "a" / "pid").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    def not_passed_on(signum, frame):
        raise AssertionError("the SIGTERM stopped the sweep without reaching its point")

    previous = signal.signal(signal.SIGTERM, not_passed_on)
    try:
        threading.Thread(target=preempt, daemon=True).start()
        with pytest.raises(SystemExit) as exited:
            sweep.run(str(experiment), workdir, [])
        assert signal.getsignal(signal.SIGTERM) is not_passed_on  # the sweep's handler is gone
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exited.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (
        "sweep: received SIGTERM and passed it to point a, which stopped (exit 0): relaunch the same "
        "command to resume the sweep from that point (finished points are skipped)\n")
    assert (workdir / "a" / "saved").read_text() == str(int(signal.SIGTERM))
    with pytest.raises(ProcessLookupError):  # ended, and reaped by the sweep
        os.kill(int((workdir / "a" / "pid").read_text()), 0)
    assert sorted(p.name for p in workdir.iterdir()) == ["a"]  # b never started, no report


@pytest.mark.slow
def test_sigterm_to_a_sequential_sweep_saves_its_point_and_leaves_none_running(tmp_path,
                                                                              digits_data_dir):
    experiment, workdir = tmp_path / "exp.py", tmp_path / "sweep"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    sweep_job = _launch(experiment, workdir, "--config.num_epochs=1000")
    for line in sweep_job.stdout:  # until its first point trains
        if "parameters;" in line:
            break
    point = json.loads((workdir / "dim8-seed0" / "run.lock").read_text())["pid"]
    sweep_job.send_signal(signal.SIGTERM)
    status, out, err = _finish(sweep_job, 120)
    assert status == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (
        "sweep: received SIGTERM and passed it to point dim8-seed0, which stopped (exit 0): relaunch "
        "the same command to resume the sweep from that point (finished points are skipped)")
    assert "received SIGTERM: saved a checkpoint at step" in out  # the point's own line
    with pytest.raises(ProcessLookupError):  # no point left training
        os.kill(point, 0)
    assert sweep.state(workdir / "dim8-seed0")[0] == "interrupted"
    assert not (workdir / "dim8-seed1").exists()


def _launch(experiment, workdir, *flags, **popen):
    """launch.py --sweep on `experiment` in `workdir` with `flags`: a started process."""
    return subprocess.Popen([sys.executable, "launch.py", f"--config={experiment}", "--sweep",
                             f"--workdir={workdir}", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(process, timeout=300):
    """(returncode, stdout, stderr) of a started process, once it ends."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _without_speed(text: str) -> list[list[str]]:
    """The cells of sweep.csv / sweep.md's table rows without train_images_per_s (a timing)."""
    index = None
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("|", ",").split(",")]
        if "train_images_per_s" in cells:
            index = cells.index("train_images_per_s")
        rows.append([c for i, c in enumerate(cells) if i != index] if index is not None else cells)
    return rows


def _hparams_plugin_data(run_dir):
    """{tag: HParamsPluginData} of the TensorBoard events in `run_dir`, as the HParams dashboard
    reads them, and the run's scalar tags."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = event_accumulator.EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    return ({tag: plugin_data_pb2.HParamsPluginData.FromString(data)
             for tag, data in content.items()}, events.Tags()["scalars"])


@pytest.mark.slow
def test_point_out_of_range_or_unknown_is_one_error_line(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    for which in ("2", "dim99-seed0"):
        status, out, err = _finish(_launch(experiment, tmp_path / "sweep", f"--point={which}"), 120)
        assert status == 2
        assert err.strip() == (f"error: --point={which}: no such sweep point; the valid ones are "
                               "0..1 or a name: dim8-seed0, dim8-seed1")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_concurrent_points_collected_as_a_sequential_sweep(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    sequential, concurrent = tmp_path / "sequential", tmp_path / "concurrent"
    status, out, err = _finish(_launch(experiment, sequential))
    assert status == 0, err[-2000:]

    # Two jobs of an array, at once, into one directory (by index and by name); nothing shared
    # is written by them.
    jobs = [_launch(experiment, concurrent, "--point=0"),
            _launch(experiment, concurrent, "--point=dim8-seed1")]
    for job in jobs:
        status, out, err = _finish(job)
        assert status == 0, err[-2000:]
        assert "sweep: starting dim8-seed" in out
    assert sorted(p.name for p in concurrent.iterdir()) == ["dim8-seed0", "dim8-seed1"]

    status, out, err = _finish(_launch(experiment, concurrent, "--collect"), 120)
    assert status == 0, err
    assert "2 finished point(s) tabulated" in out and "running" not in out
    for name in ("sweep.csv", "sweep.md"):
        assert _without_speed((concurrent / name).read_text()) == \
            _without_speed((sequential / name).read_text())

    # Each point's HParams summary: its overrides, its final validation and test metrics.
    plugin, scalars = _hparams_plugin_data(concurrent / "dim8-seed1" / "tensorboard")
    experiment_info = plugin["_hparams_/experiment"].experiment
    assert {h.name for h in experiment_info.hparam_infos} == {"model.dim", "seed"}
    metrics = {m.name.tag for m in experiment_info.metric_infos}
    assert {"val/top1", "test/top1", "test/top5"} <= metrics and metrics <= set(scalars)
    start = plugin["_hparams_/session_start_info"].session_start_info
    assert start.hparams["model.dim"].number_value == 8 and start.hparams["seed"].number_value == 1
    assert "_hparams_/session_end_info" in plugin


def _has_checkpoint(point_dir) -> bool:
    checkpoints = point_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


@pytest.mark.slow
def test_killed_point_is_listed_then_resumes_with_point(tmp_path, digits_data_dir):
    experiment = tmp_path / "exp.py"
    _write_sweep_experiment(experiment, digits_data_dir, 2)
    workdir, point_dir = tmp_path / "sweep", tmp_path / "sweep" / "dim8-seed0"
    job = _launch(experiment, workdir, "--point=0", "--config.num_epochs=6",
                  start_new_session=True)
    deadline = time.monotonic() + 240
    while not _has_checkpoint(point_dir) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGSTOP)  # held still at its first checkpoint, its lock live
    try:
        assert _has_checkpoint(point_dir) and not (point_dir / "summary.json").exists()
        status, out, err = _finish(_launch(experiment, workdir, "--collect"), 120)
        assert status == 0, err
        assert "sweep: 1 running:\n  0 dim8-seed0: process" in out
        assert "sweep: 1 not started:\n  1 dim8-seed1" in out
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # as a node that dies
        job.communicate()

    status, out, err = _finish(_launch(experiment, workdir, "--collect"), 120)
    assert "sweep: 1 interrupted:\n  0 dim8-seed0: resumes from the checkpoint at step" in out

    # A relaunch with another config is refused: the point shows as failed, with that error line.
    status, out, err = _finish(_launch(experiment, workdir, "--point=0", "--config.num_epochs=7"))
    assert status == 2 and err.startswith("error: ") and "holds another run" in err
    status, out, err = _finish(_launch(experiment, workdir, "--collect"), 120)
    assert f"sweep: 1 failed:\n  0 dim8-seed0: {err.strip().removeprefix('error: ')}" in out

    status, out, err = _finish(_launch(experiment, workdir, "--point=dim8-seed0",
                                       "--config.num_epochs=6"))
    assert status == 0, err[-2000:]
    assert "sweep: resuming dim8-seed0" in out and "resumed from the checkpoint at step" in out
    status, out, err = _finish(_launch(experiment, workdir, "--collect"), 120)
    assert "1 finished point(s) tabulated" in out and "failed" not in out
    assert "interrupted" not in out and "sweep: 1 not started" in out
    assert len((workdir / "sweep.csv").read_text().splitlines()) == 2
