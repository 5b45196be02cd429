"""Checkpoints: exact resume after SIGTERM and SIGKILL, evaluation of saved runs, bad workdirs, and
checkpoints of another model (or the other trunk of the tutorial PatchConvNet) refused."""

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    ROOT,
    digits_config,
    preempted_when,
    tiny_patch_convnet_config,
    tutorial_trunk_config,
)

import attn_jax
from attn_jax import checkpoint, modes, registry, run_guard, run_record, train
from attn_jax.bench.compilations import count_compilations
from attn_jax.errors import RunFault, UserError
from attn_jax.run_guard import relaunch_advice
from attn_jax.state import initial_state

# A tiny PatchConvNet on 480 digits: 30 steps per epoch, 2 epochs, a checkpoint every 10 steps and
# a log line every step (so the test can see the step the run has reached); an EMA of the parameters
# (decay 0.9 after a warm-up, so it stays well apart from them), saved and resumed with the rest.
OVERRIDES = {"dataset.train_split": "train[:480]", "dataset.val_split": "train[1150:1270]",
             "dataset.test_split": "test[:128]",
             "batch_size": 16, "eval_batch_size": 64, "num_epochs": 2, "log_every_steps": 1,
             "preprocess.size": 16, "preprocess.train_resize": 18, "preprocess.crop": 16,
             "model.dim": 16, "checkpoint.every_steps": 10, "ema.decay": 0.9, "ema.warmup": True}


def _config(data_dir):
    return digits_config(data_dir, OVERRIDES)


def _launch(workdir, data_dir, extra=()) -> subprocess.Popen:
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra)
    return subprocess.Popen(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_step(process, workdir, step, timeout=240):
    """Blocks until metrics.jsonl reports `step` (or later); returns the step reached."""
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and (lines := path.read_text().splitlines()):
            reached = json.loads(lines[-1])["step"]
            if reached >= step:
                return reached
        time.sleep(0.02)
    raise TimeoutError(f"the run did not reach step {step}")


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_state(workdir):
    """(the latest checkpoint's step, its train state as saved: a dict of params, ema_params, ...)."""
    manager = ocp.CheckpointManager(workdir / "checkpoints",
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return manager.latest_step(), restored["state"]


def _final_params(workdir):
    step, state = _final_state(workdir)
    return step, state["params"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_data_dir):
    """An uninterrupted run, trained in this process."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    final = train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    return workdir, final


# The device-resident path, and the streamed one read by 2 grain worker processes.
PATHS = {"resident": [], "streamed": ["--config.dataset.resident_limit_mib=0",
                                      "--config.dataset.read_workers=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("path, seed", [("resident", 1), ("streamed", 2)])
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path, digits_data_dir,
                                                               finished_run, path, seed):
    reference, _ = finished_run
    workdir = tmp_path / "interrupted"
    rng = random.Random(seed)  # fixed kill points: a failure reruns the same way

    def launch():
        return _launch(workdir, digits_data_dir, PATHS[path])

    # SIGTERM to the whole process group, as a scheduler sends it (grain's workers included):
    # finish the step, save, say so, exit 0.
    process = launch()
    _wait_for_step(process, workdir, rng.randint(3, 18))
    if path == "resident":  # a second run in the same workdir meanwhile: refused, nothing mixed
        os.killpg(process.pid, signal.SIGSTOP)  # held still meanwhile: the SIGTERM lands early
        second = launch()
        _, second_err = second.communicate(timeout=120)
        os.killpg(process.pid, signal.SIGCONT)
        assert second.returncode == 2 and f"{workdir} is in use by process {process.pid}" in second_err
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "received SIGTERM: saved a checkpoint at step" in out
    saved_at = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
    assert saved_at in [int(p.name) for p in (workdir / "checkpoints").iterdir()]

    # SIGKILL at a random later step (a periodic save between, unless the SIGTERM landed late on a
    # loaded machine): no chance to save anything.
    process = launch()
    killed_at = _wait_for_step(process, workdir, min(saved_at + rng.randint(12, 30), 58))
    process.kill()
    process.wait()

    # Relaunch: resumes from the last checkpoint before the kill and finishes.
    process = launch()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert ("on the devices" if path == "resident" else "streamed") in out
    resumed_from = int(out.split("resumed from the checkpoint at step ")[1].split()[0])
    assert saved_at <= resumed_from <= killed_at  # a save in flight at the kill is not restored

    (step, state), (ref_step, ref_state) = _final_state(workdir), _final_state(reference)
    assert step == ref_step == 60
    for part in ("params", "ema_params"):  # the EMA too, bitwise
        for a, b in zip(jax_leaves(state[part]), jax_leaves(ref_state[part]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(  # an average, not a copy
        jax_leaves(state["params"]), jax_leaves(state["ema_params"]), strict=True))
    assert _records(workdir) == _records(reference)  # no line lost or duplicated (val/ema_top1 too)
    assert any("val/ema_top1" in r for r in _records(workdir))


def jax_leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.slow
def test_eval_mode_reproduces_the_final_test_metrics(digits_data_dir, finished_run):
    workdir, final = finished_run
    metrics = modes.evaluate_checkpoint(_config(digits_data_dir), str(workdir), "latest")
    assert metrics["step"] == 60
    for key in ("test/loss", "test/top1", "test/top5"):
        assert metrics[key] == final[key]
    ema = modes.evaluate_checkpoint(_config(digits_data_dir), str(workdir), "latest", params="ema")
    for key in ("loss", "top1", "top5"):
        assert ema[f"test/{key}"] == final[f"test/ema_{key}"]
    assert json.loads((workdir / "eval_latest_test.json").read_text())["test/top1"] == final["test/top1"]
    best = modes.evaluate_checkpoint(_config(digits_data_dir), str(workdir), "best")
    best_val = max(r["val/top1"] for r in _records(workdir) if "val/top1" in r)
    val_at_best = [r["val/top1"] for r in _records(workdir) if r["step"] == best["step"] and "val/top1" in r]
    assert val_at_best == [best_val]


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_left_intact(digits_data_dir, finished_run):
    workdir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    config = _config(digits_data_dir)
    config.model.dim = 24
    with pytest.raises(UserError, match=r"different model or data order \(model.dim: checkpoint 16 "
                                        r"vs config 24\)"):
        train.train_and_evaluate(config, str(workdir))
    with pytest.raises(UserError, match="different model"):
        modes.evaluate_checkpoint(config, str(workdir), "latest")
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    assert after == before  # nothing written, nothing overwritten


@pytest.mark.slow
def test_run_saved_in_the_tf_data_order_is_refused_but_evaluates(tmp_path, digits_data_dir,
                                                                 finished_run):
    """Checkpoints from before the one permutation per epoch (tf.data's shuffle, no `data_order`)
    are not resumed in another order; evaluating them is fine."""
    config = _config(digits_data_dir)
    workdir = tmp_path / "old"
    run = train.build_run(config, train.create_mesh(), workdir)
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    ckpt.save(run.state, train.zero_sums(run.mesh), checkpoint.model_description(config))
    ckpt.close()
    with pytest.raises(UserError, match="data_order: checkpoint None vs config 'permutation-v1'"):
        train.train_and_evaluate(config, str(workdir))
    assert modes.evaluate_checkpoint(config, str(workdir), "latest")["step"] == 0


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, digits_data_dir,
                                                               finished_run, capsys):
    workdir = tmp_path / "corrupted"
    shutil.copytree(finished_run[0], workdir)
    (workdir / "summary.json").unlink()  # a crash before the end: the run is not finished
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for path in (workdir / "checkpoints" / str(steps[-1]) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with count_compilations() as compilations:
        final = train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    # A resumed run compiles each step once: the partial last evaluation batch (val: 120 = 64 + 56)
    # is padded to the compiled shape, and the val and test splits share the eval step.
    assert (compilations["jit(train_call)"], compilations["jit(eval_step)"]) == (1, 1)
    out = capsys.readouterr().out
    assert f"checkpoint {workdir / 'checkpoints' / str(steps[-1])} is unreadable" in out
    assert (workdir / "checkpoints_unreadable" / str(steps[-1])).is_dir()  # set aside, not lost
    assert f"resumed from the checkpoint at step {steps[-2]}" in out
    assert final["test/top1"] == finished_run[1]["test/top1"]  # replayed to the same end

    for step in steps:  # every checkpoint unreadable: an error, never a silent fresh start
        for path in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="no readable checkpoint"):
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))


@pytest.mark.slow
def test_a_finished_run_relaunched_changes_nothing(tmp_path, digits_data_dir, finished_run, capsys):
    """Relaunched (even with another batch size, or with its checkpoints gone), a finished run says
    so and writes nothing; a workdir with logs but no checkpoint is not started afresh."""
    workdir = tmp_path / "finished"
    shutil.copytree(finished_run[0], workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    config = _config(digits_data_dir)
    config.batch_size = 32
    assert train.train_and_evaluate(config, str(workdir)) == json.loads(
        (workdir / "summary.json").read_text())
    assert f"the run in {workdir} is finished" in capsys.readouterr().out
    shutil.rmtree(workdir / "checkpoints")
    train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == {p: b for p, b in before.items() if "checkpoints" not in p.parts}

    (workdir / "summary.json").unlink()  # logs, no summary, no checkpoint
    with pytest.raises(UserError, match=r"holds a run's outputs \(metrics.jsonl.*no checkpoint"):
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))


@pytest.mark.slow
def test_killed_after_the_last_epoch_line_the_relaunch_only_evaluates(tmp_path, digits_data_dir,
                                                                    finished_run):
    """SIGKILL the moment the last epoch's line is out (the final test evaluation not yet run): the
    relaunch resumes at the last step, trains nothing, and ends with the uninterrupted run's test
    metrics and log."""
    reference, final = finished_run
    workdir = tmp_path / "killed"
    process = _launch(workdir, digits_data_dir)
    for line in process.stdout:
        if line.startswith("epoch 2/2 "):
            process.kill()
            break
    process.wait()
    assert not (workdir / "summary.json").exists()  # killed before the test evaluation ended

    process = _launch(workdir, digits_data_dir)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert "resumed from the checkpoint at step 60" in out
    assert not [line for line in out.splitlines() if line.startswith(("step ", "epoch "))]
    summary = json.loads((workdir / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k.startswith("test/")} == {
        k: v for k, v in final.items() if k.startswith("test/")}
    assert _records(workdir) == _records(reference)


@pytest.mark.slow
def test_a_relaunch_with_another_config_is_refused_and_the_run_recorded(tmp_path, digits_data_dir,
                                                                         finished_run):
    """DIR/run.json records the config, commit, versions and devices; resuming with a config that
    computes something else is refused naming the fields, while logging cadence may change."""
    workdir = tmp_path / "resumable"
    shutil.copytree(finished_run[0], workdir)
    (workdir / "summary.json").unlink()  # interrupted before the end
    record = json.loads((workdir / "run.json").read_text())
    assert record["config"]["model.dim"] == 16 and record["config"]["batch_size"] == 16
    launch = record["launches"][0]
    assert launch["versions"]["jax"] and "cpu" in launch["devices"]
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    config = _config(digits_data_dir)
    config.batch_size, config.optimizer.learning_rate = 32, 5e-3
    with pytest.raises(UserError, match=r"holds another run \(batch_size: 16 -> 32; "
                                        r"optimizer.learning_rate: 0.001 -> 0.005\)"):
        train.train_and_evaluate(config, str(workdir))
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    config = _config(digits_data_dir)
    config.log_every_steps = 7  # how the run is carried out may change
    train.train_and_evaluate(config, str(workdir))
    assert len(json.loads((workdir / "run.json").read_text())["launches"]) == 2


@pytest.mark.slow
def test_a_run_preempted_on_one_device_resumes_on_eight(tmp_path, digits_data_dir, finished_run):
    """A TPU slice of another size after a preemption: stopped by SIGTERM at step 25 on 1 device,
    resumed on 8, the run ends like the uninterrupted 8-device one up to float rounding (1 and 8
    devices reduce in another order) with every log line once."""
    reference, _ = finished_run
    workdir = tmp_path / "preempted"
    with preempted_when(lambda step, scalars: step == 25 and "train/loss" in scalars):
        assert train.train_and_evaluate(_config(digits_data_dir), str(workdir),
                                        train.create_mesh(jax.devices()[:1])) is None
    final = train.train_and_evaluate(_config(digits_data_dir), str(workdir))  # all 8 devices
    launches = json.loads((workdir / "run.json").read_text())["launches"]
    assert [entry["devices"].split(" x ")[0] for entry in launches] == ["1", "8"]
    records, ref_records = _records(workdir), _records(reference)
    assert [r["step"] for r in records] == [r["step"] for r in ref_records]
    np.testing.assert_allclose([r.get("train/loss", 0) for r in records],
                               [r.get("train/loss", 0) for r in ref_records], rtol=1e-4)
    step, params = _final_params(workdir)
    assert step == _final_params(reference)[0] == 60 and final["test/examples"] == 128
    for a, b in zip(jax_leaves(params), jax_leaves(_final_params(reference)[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # near-zero weights: Adam


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_the_relaunch_resumes_exactly(
        tmp_path, digits_data_dir, finished_run, monkeypatch):
    """An OSError mid-run (here ENOSPC while writing metrics.jsonl at step 25) stops the run, a
    RunFault carrying one line naming the path and the cause; the checkpoint of step 20 is intact
    and the relaunch ends bitwise like the uninterrupted run."""
    import errno

    from attn_jax import metrics_log
    from attn_jax.errors import describe_environment_error, environment_error

    workdir = tmp_path / "full_disk"
    write = metrics_log.MetricsLog.write

    def write_until_full(self, step, epoch, scalars):
        if step == 25:
            raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "metrics.jsonl"))
        write(self, step, epoch, scalars)

    with monkeypatch.context() as patch, pytest.raises(RunFault) as raised:
        patch.setattr(metrics_log.MetricsLog, "write", write_until_full)
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    assert str(raised.value) == (  # the API's own error, with the line launch.py prints
        f"{workdir / 'metrics.jsonl'}: No space left on device. The checkpoint at step 20 is kept: "
        "fix this, then relaunch the same command to resume from it")
    wrapped = RuntimeError("orbax: save failed")
    wrapped.__cause__ = raised.value.__cause__
    assert describe_environment_error(environment_error(wrapped), relaunch_advice(workdir)) == str(
        raised.value)
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.0.count/0" in OCDBT database at '
                       'local file "/run/checkpoints/34/": Failed writing')  # a real full disk's
    assert (environment_error(orbax).errno, environment_error(orbax).filename) == (
        errno.ENOSPC, "/run/checkpoints/34/")
    assert environment_error(ValueError("a bug")) is None  # not a fault of the machine
    assert not (workdir / "run.lock").exists()  # released: the relaunch is not refused
    train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    step, params = _final_params(workdir)
    ref_step, ref_params = _final_params(finished_run[0])
    assert step == ref_step == 60
    for a, b in zip(jax_leaves(params), jax_leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _records(workdir) == _records(finished_run[0])


@pytest.mark.slow
def test_signals_before_the_first_step_and_while_finishing(tmp_path, digits_data_dir, monkeypatch,
                                                           capsys):
    """SIGTERM during compilation: nothing written, a line saying so. SIGTERM while the results are
    written: the run still finishes them (the last checkpoint committed), and says so."""
    from attn_jax import attention_maps

    workdir = tmp_path / "signals"
    compile_ = train.Run.compile

    def compile_then_signal(self):
        seconds = compile_(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return seconds

    with monkeypatch.context() as patch:
        patch.setattr(train.Run, "compile", compile_then_signal)
        assert train.train_and_evaluate(_config(digits_data_dir), str(workdir)) is None
    assert "received SIGTERM before the first step: nothing saved" in capsys.readouterr().out
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "run.lock").exists()

    plot = attention_maps.plot_curves

    def plot_then_signal(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return plot(*args)

    with monkeypatch.context() as patch:
        patch.setattr(attention_maps, "plot_curves", plot_then_signal)
        final = train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    assert final["test/examples"] == 128 and (workdir / "summary.json").exists()
    assert "received SIGTERM while finishing: the run is finished" in capsys.readouterr().out
    assert 60 in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict


def test_checkpoint_of_the_other_trunk_variant_is_refused(tmp_path):
    """checkpoint.model_description holds config.model, so tie_trunk must agree to restore."""
    images = jnp.zeros((1, 16, 16, 3))
    configs = {t: tutorial_trunk_config(t) for t in (True, False)}
    states = {t: _State(jnp.array(1), registry.create_model(c, 10).init(
        jax.random.key(0), images, train=False)["params"]) for t, c in configs.items()}
    sums = {"count": jnp.zeros(())}
    for saved, other in ((True, False), (False, True)):
        ckpt = checkpoint.Checkpointer(tmp_path / str(saved), keep=1)
        ckpt.save(states[saved], sums, checkpoint.model_description(configs[saved]))
        ckpt.wait()
        with pytest.raises(UserError, match=rf"different model.*model\.tie_trunk: checkpoint "
                                            rf"{saved} vs config {other}"):
            ckpt.restore(1, states[other], sums, checkpoint.model_description(configs[other]))
        # Even with the description ignored, the parameter trees differ and are refused.
        with pytest.raises(UserError, match="does not fit this model"):
            ckpt._check_shapes(1, states[other])
        restored, _ = ckpt.restore(1, states[saved], sums,
                                   checkpoint.model_description(configs[saved]))
        assert jax.tree.structure(restored.params) == jax.tree.structure(states[saved].params)
        ckpt.close()


def test_checkpoint_from_before_tie_trunk_restores_as_untied_only(tmp_path):
    """A description without model.tie_trunk was saved by the untied model, the only one then."""
    images = jnp.zeros((1, 16, 16, 3))
    configs = {t: tutorial_trunk_config(t) for t in (True, False)}
    states = {t: _State(jnp.array(1), registry.create_model(c, 10).init(
        jax.random.key(0), images, train=False)["params"]) for t, c in configs.items()}
    sums = {"count": jnp.zeros(())}
    old = checkpoint.model_description(configs[False])
    del old["model"]["tie_trunk"]
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    ckpt.save(states[False], sums, old)
    ckpt.wait()
    restored, _ = ckpt.restore(1, states[False], sums, checkpoint.model_description(configs[False]))
    assert jax.tree.structure(restored.params) == jax.tree.structure(states[False].params)
    with pytest.raises(UserError, match=r"model\.tie_trunk: checkpoint False vs config True"):
        ckpt.restore(1, states[True], sums, checkpoint.model_description(configs[True]))
    ckpt.close()


def _assert_ends_like(workdir, reference):
    """The run in `workdir` ended bitwise like the uninterrupted `reference` run, every line kept."""
    step, params = _final_params(workdir)
    ref_step, ref_params = _final_params(reference)
    assert step == ref_step == 60
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _records(workdir) == _records(reference)


@pytest.mark.slow
def test_signals_during_validation_and_during_its_save_lose_nothing(
        tmp_path, digits_data_dir, finished_run, monkeypatch, capsys):
    """SIGTERM while epoch 1 is validated: the validation finishes, the epoch's checkpoint is saved
    with its metrics, the run says so and stops. A second and a third signal (SIGTERM, SIGINT)
    while that checkpoint is being written change nothing: it is committed whole, and the relaunch
    ends bitwise like the uninterrupted run."""
    workdir = tmp_path / "signals"
    evaluate, save = train.evaluate, checkpoint.Checkpointer.save
    sent = []

    def evaluate_under_a_signal(*args, **kwargs):
        if not sent:  # the first evaluation: epoch 1's validation
            sent.append("validation")
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    def save_under_signals(self, state, *args, **kwargs):
        save(self, state, *args, **kwargs)  # the asynchronous write has started
        if sent == ["validation"]:
            sent.append("save")
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", evaluate_under_a_signal)
        patch.setattr(checkpoint.Checkpointer, "save", save_under_signals)
        assert train.train_and_evaluate(_config(digits_data_dir), str(workdir)) is None
    assert sent == ["validation", "save"]
    assert "received SIGINT: saved a checkpoint at step 30; relaunch" in capsys.readouterr().out
    assert int(max(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())) == 30
    assert "val/top1" in _records(workdir)[-1]  # epoch 1's validation was logged whole
    train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    _assert_ends_like(workdir, finished_run[0])


@pytest.mark.slow
def test_a_run_stopped_after_its_last_step_summarises_as_an_uninterrupted_one(
        tmp_path, digits_data_dir, finished_run):
    """SIGTERM once the last epoch is validated, before the test evaluation: the relaunch trains
    nothing and writes the uninterrupted run's summary, key for key: the same metrics and learning
    rate; images/s the median over every log interval measured (all in the first launch); the wall
    time the first launch's training time (kept in its checkpoint) and the relaunch's."""
    workdir = tmp_path / "stopped_at_the_end"
    with preempted_when(lambda step, scalars: step == 60 and "val/loss" in scalars):
        assert train.train_and_evaluate(_config(digits_data_dir), str(workdir)) is None
    ckpt = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
    pace = train.carried_pace(ckpt, 60)
    ckpt.close()
    final = train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    whole = finished_run[1]
    timings = ("train_images_per_s", "wall_time_s")
    assert final.keys() == whole.keys() and "learning_rate" in final
    assert {k: v for k, v in final.items() if k not in timings} == \
        {k: v for k, v in whole.items() if k not in timings}
    assert final["train_images_per_s"] == float(np.median(pace["images_per_s"]))
    assert final["wall_time_s"] > pace["wall_time_s"] > 0
    assert json.loads((workdir / "summary.json").read_text()) == final


@pytest.mark.slow
def test_permission_denied_while_saving_keeps_the_last_checkpoint(tmp_path, digits_data_dir,
                                                                  finished_run, monkeypatch):
    """A checkpoint folder that became unwritable (EACCES from the write of step 40: a real one needs
    a non-root user, which the tests are not) stops the run with the error; the checkpoints of
    steps 20 and 30 stay, and the relaunch after the fix resumes from 30 and ends exactly."""
    import errno

    from attn_jax.errors import describe_environment_error, environment_error

    workdir = tmp_path / "denied"
    save = checkpoint.Checkpointer.save

    def save_until_denied(self, state, *args, **kwargs):
        if int(state.step) == 40:
            raise PermissionError(errno.EACCES, "Permission denied",
                                  str(workdir / "checkpoints" / "40"))
        save(self, state, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(RunFault) as raised:
        patch.setattr(checkpoint.Checkpointer, "save", save_until_denied)
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    assert str(raised.value) == describe_environment_error(
        environment_error(raised.value), relaunch_advice(workdir)) == (
        f"{workdir / 'checkpoints' / '40'}: Permission denied. The checkpoint at step 30 is kept: "
        "fix this, then relaunch the same command to resume from it")
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == 30 and not (workdir / "run.lock").exists()
    train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    _assert_ends_like(workdir, finished_run[0])


@pytest.mark.parametrize("code, cause", [(2, "No such file or directory"),  # a folder deleted
                                         (13, "Permission denied"),
                                         (28, "No space left on device"),
                                         (30, "Read-only file system")])
def test_each_environment_fault_is_one_line_naming_the_path_and_the_cause(code, cause):
    from attn_jax.errors import describe_environment_error, environment_error

    fault = OSError(code, os.strerror(code), "/runs/x/checkpoints/40")
    wrapped = RuntimeError("orbax: the save failed")
    wrapped.__cause__ = fault
    line = describe_environment_error(environment_error(wrapped))  # a mode that trains nothing
    assert line == f"/runs/x/checkpoints/40: {cause}. Fix this, then relaunch the same command"
    assert "\n" not in line


def test_too_many_open_files_is_one_line_with_the_limit_not_a_full_disk(monkeypatch):
    """tensorstore reports running out of file descriptors as RESOURCE_EXHAUSTED, as it does a full
    disk: the line names the OS error its message carries, the process's limit and how to raise it."""
    import resource

    from attn_jax.errors import describe_environment_error, environment_error

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (32, 4096))
    orbax = ValueError('RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing '
                       '"params/.zarray" in OCDBT database at local file "/run/checkpoints/20/": '
                       'Failed to open directory: "/run/checkpoints/20/d": Too many open files')
    assert describe_environment_error(environment_error(orbax)) == (
        "too many open files: this process may open 32 (`ulimit -n`); raise it with `ulimit -n` "
        "before launching (up to 4096, the hard limit). Fix this, then relaunch the same command")


def test_a_fault_line_says_what_the_training_run_keeps(tmp_path):
    """Its newest committed checkpoint, or none, and then whether its logs stand in the way of a
    fresh start (a relaunch refuses to start afresh over them)."""
    from attn_jax.errors import describe_environment_error

    workdir = tmp_path / "run"
    fault = OSError(28, "No space left on device", str(workdir / "metrics.jsonl"))

    def line():
        return describe_environment_error(fault, relaunch_advice(workdir))

    start = f"{workdir / 'metrics.jsonl'}: No space left on device."
    assert line() == (f"{start} No checkpoint was saved: fix this, then relaunch the same command "
                      "to start the run afresh")  # a fault before the workdir was even made
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 5}\n')
    assert line() == (f"{start} No checkpoint was saved, so the run cannot resume: fix this, then "
                      f"move metrics.jsonl out of {workdir} (or use another --workdir) to start "
                      "afresh")
    for name in ("20", "30", "40.orbax-checkpoint-tmp-1"):  # the last one half-written
        (workdir / "checkpoints" / name).mkdir(parents=True)
    assert line() == (f"{start} The checkpoint at step 30 is kept: fix this, then relaunch the "
                      "same command to resume from it")


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and run files: one never blocks the others, and each is one line
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """(a workdir holding the tiny PatchConvNet's checkpoints at steps 10, 20 and 30, validation
    top-1 0.1, 0.3 and 0.2, and its run.json, as training leaves them; its config; the state
    saved: zeros of the train state's shapes and shardings, so nothing is compiled). No data is
    read."""
    config = tiny_patch_convnet_config()
    workdir = tmp_path_factory.mktemp("three")
    mesh = train.create_mesh()
    _, _, abstract = initial_state(config, mesh, total_steps=30, abstract=True)
    state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), abstract)
    run_record.check_and_record(workdir, config, mesh, resuming=False)
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    for step, top1 in ((10, 0.1), (20, 0.3), (30, 0.2)):
        ckpt.save(_at(state, step), train.zero_sums(mesh), checkpoint.run_description(config),
                  metrics={"val/top1": top1})
    ckpt.close()
    return workdir, config, state


def _at(state, step: int):
    """`state` at `step` (replicated as the state's own step)."""
    return state.replace(step=jax.device_put(np.asarray(step, state.step.dtype), state.step.sharding))


def _copy(three_checkpoints, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], workdir)
    return workdir


def _truncate_data(step_dir):
    """Cuts every data file of the checkpoint's train state to half its length."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_checkpoint_with_garbled_metrics_blocks_no_other(three_checkpoints, tmp_path, capsys):
    """orbax reads every checkpoint's metrics when it opens the folder: one garbled file made every
    checkpoint unreachable. The intact ones load; 'best' and 'latest' pass over the damaged one,
    saying so; the damaged one asked for is one line naming it, why, and the others."""
    workdir = _copy(three_checkpoints, tmp_path)
    (workdir / "checkpoints" / "20" / "metrics" / "metrics").write_bytes(b"\x00\xffjunk{{")
    assert attn_jax.load(workdir, "30").step == 30
    assert attn_jax.load(workdir, "best").step == 30  # 20, the best, is damaged: 30 beats 10
    assert "warning: passed over the unreadable checkpoint" in capsys.readouterr().out
    with pytest.raises(UserError) as raised:
        attn_jax.load(workdir / "checkpoints" / "20")
    assert isinstance(raised.value, RunFault)
    assert str(raised.value) == (
        f"checkpoint {workdir / 'checkpoints' / '20'} is unreadable (metrics/metrics is not valid "
        "JSON: Expecting value: line 1 column 1 (char 0)): choose another of its checkpoints "
        "(steps [10, 30])")
    (workdir / "checkpoints" / "30" / "metrics" / "metrics").write_text("[1, 2]")
    assert attn_jax.load(workdir, "latest").step == 10
    assert "checkpoints/30 (metrics/metrics holds no val/top1)" in capsys.readouterr().out


def test_resume_sets_each_damaged_checkpoint_aside_and_restores_the_newest_intact(
        three_checkpoints, tmp_path, capsys):
    """Step 30 unlistable (garbled metrics), step 20 unreadable (its data cut short): both are
    moved to checkpoints_unreadable/, a warning line each, and step 10 is restored. What was set
    aside before is kept (30 again goes to 30.2), and the steps set aside can be saved again."""
    workdir, (_, config, state) = _copy(three_checkpoints, tmp_path), three_checkpoints
    (workdir / "checkpoints" / "30" / "metrics" / "metrics").write_text("junk")
    _truncate_data(workdir / "checkpoints" / "20")
    (workdir / "checkpoints_unreadable" / "30").mkdir(parents=True)
    (workdir / "checkpoints_unreadable" / "30" / "earlier").write_text("kept")
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    sums = train.zero_sums(train.create_mesh())
    restored, _ = ckpt.restore_latest(state, sums, checkpoint.run_description(config))
    assert int(restored.step) == 10
    out = capsys.readouterr().out
    for step, target, why in ((30, "30.2", "metrics/metrics is not valid JSON"),
                              (20, "20", "OUT_OF_RANGE")):
        assert (f"warning: checkpoint {workdir / 'checkpoints' / str(step)} is unreadable ({why}"
                in out and f"moved it to {workdir / 'checkpoints_unreadable' / target}\n" in out)
    aside = workdir / "checkpoints_unreadable"
    assert sorted(p.name for p in aside.iterdir()) == ["20", "30", "30.2"]
    assert (aside / "30" / "earlier").read_text() == "kept"
    ckpt.save(_at(state, 30), sums, checkpoint.run_description(config), metrics={"val/top1": 0.5})
    ckpt.wait()
    assert ckpt.steps() == [10, 30] and ckpt.resolve("best") == 30
    ckpt.close()


def test_a_truncated_checkpoint_is_one_line_without_tensorstores_spec(three_checkpoints, tmp_path):
    workdir = _copy(three_checkpoints, tmp_path)
    _truncate_data(workdir / "checkpoints" / "30")
    for source in (workdir / "checkpoints" / "30", workdir):
        with pytest.raises(RunFault, match=rf"^checkpoint {workdir / 'checkpoints' / '30'} is "
                                           r"unreadable \(OUT_OF_RANGE: [^\n{]*\): choose another "
                                           r"of its checkpoints \(steps \[10, 20\]\)$"):
            attn_jax.load(source, "latest")


def test_load_takes_a_step_number_and_refuses_an_empty_step_folder(three_checkpoints, tmp_path):
    workdir = _copy(three_checkpoints, tmp_path)
    assert attn_jax.load(workdir, 20).step == 20
    (workdir / "checkpoints" / "40").mkdir()
    with pytest.raises(RunFault, match=r"checkpoints/40 is unreadable \(it holds no state/ folder\): "
                                       r"choose another of its checkpoints \(steps \[10, 20, 30\]\)$"):
        attn_jax.load(workdir / "checkpoints" / "40")
    with pytest.raises(UserError, match=r"^--checkpoint=25: use 'best', 'latest' or one of the "
                                        r"saved steps \[10, 20, 30\]$"):
        attn_jax.load(workdir, 25)
    with pytest.raises(UserError, match=r"^checkpoint 2.5: use 'best', 'latest' or a step number$"):
        attn_jax.load(workdir, 2.5)


@pytest.mark.parametrize("content, why", [
    (b'{"config": {"seed": 0', r"not valid JSON: Expecting ',' delimiter: line 1 column 22"),
    (b"\x00\xff garbage", r"not valid JSON: Expecting value: line 1 column 1 \(char 0\)"),
    (b"\x80 garbage", r"not text: byte 0x80 at position 0"),
    (b"[1, 2]\n", r"it holds an array, not a JSON object"),
    (b'{"launches": []}\n', r'no "config" object or "launches" list')])
def test_a_damaged_run_record_is_one_line(three_checkpoints, tmp_path, content, why):
    workdir, config = _copy(three_checkpoints, tmp_path), three_checkpoints[1]
    (workdir / "run.json").write_bytes(content)
    damaged = rf"^{workdir / 'run.json'} is damaged \({why}.*\): "
    with pytest.raises(RunFault, match=damaged + "pass the config the run was launched with "):
        attn_jax.load(workdir)
    with pytest.raises(RunFault, match=damaged + "it records the config this run was launched "
                                                 "with: put back a good copy, or move it away"):
        run_record.check_and_record(workdir, config, train.create_mesh(), resuming=True)
    assert attn_jax.load(workdir, config=config).step == 20  # with its config, the run loads


def test_a_damaged_summary_is_one_line(tmp_path):
    (tmp_path / "summary.json").write_text('{"test/top1": 0.9')
    with pytest.raises(RunFault, match=rf"^{tmp_path / 'summary.json'} is damaged \(not valid JSON"
                                       r".*\): it holds the final results: move it away and "
                                       r"relaunch the same command to write them again$"):
        run_guard.finished_run(tmp_path)


def test_a_checkpoints_folder_removed_under_a_save_is_one_line(three_checkpoints, tmp_path,
                                                               monkeypatch):
    """orbax reports a folder removed mid-save as whichever of its writes failed first (the error
    here is one it raised so); the folder itself says what happened."""
    workdir, (_, config, state) = _copy(three_checkpoints, tmp_path), three_checkpoints
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    shutil.rmtree(ckpt.directory / "10")

    def removed_mid_save(*args, **kwargs):
        raise ValueError(f"Checkpoint directory does not exist: {ckpt.directory}/40.orbax-"
                         "checkpoint-tmp/sums.orbax-checkpoint-tmp.")

    monkeypatch.setattr(ckpt.manager, "save", removed_mid_save)
    save = functools.partial(ckpt.save, _at(state, 40), train.zero_sums(train.create_mesh()),
                             checkpoint.run_description(config))
    with pytest.raises(RunFault, match=rf"^the checkpoints of steps \[10\] in {ckpt.directory} "
                                       r"were removed while the run was saving: put back"):
        save()
    shutil.rmtree(ckpt.directory)
    with pytest.raises(RunFault, match=rf"^{ckpt.directory} was removed while the run was saving: "
                                       r"put back what was removed and relaunch the same command "
                                       r"to resume, or train afresh in another --workdir$"):
        save()


def test_the_echoes_of_a_failed_orbax_read_are_not_printed():
    """Tensorstore's late callbacks into orbax's closed event loop, and orbax's abandoned
    coroutines, each printed a traceback through sys.unraisablehook; anything else still is."""
    printed = []
    hook = checkpoint._quiet_abandoned_orbax_work(printed.append)

    async def work():
        pass

    in_orbax = work.__code__.replace(co_filename=str(Path(ocp.__file__).parent / "reader.py"))
    coroutines = {"orbax's": types.FunctionType(in_orbax, {})(), "not orbax's": work()}
    for coroutine in coroutines.values():
        coroutine.close()
    for source, message in ((None, "Event loop is closed"), (None, "something else"),
                            (coroutines["orbax's"], "orbax's"),
                            (coroutines["not orbax's"], "not orbax's")):
        hook(types.SimpleNamespace(object=source, exc_value=RuntimeError(message)))
    assert [u.exc_value.args[0] for u in printed] == ["something else", "not orbax's"]
