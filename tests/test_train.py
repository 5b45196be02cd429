"""attn_jax/train.py: the training harness end to end under tfds.testing.mock_data (the tutorial
PatchConvNet and EANet), its steps on 1 and 8 fake CPU devices, K steps per call equal to K calls,
schedule, optimizer, bfloat16 compute, and the golden first-step losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import load_experiment, random_batches, run_steps, with_overrides
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import checkpoint, data, modes, optimizer, registry, run_record, train, validate
from attn_jax.bench import steps
from attn_jax.errors import UserError
from attn_jax.metrics_log import MetricsLog
from attn_jax.run_guard import DispatchQueue
from attn_jax.state import EmaTrainState, TrainState, create_train_state, has_ema, update_ema


@pytest.mark.slow
def test_train_and_evaluate_writes_every_output(tmp_path, tiny_config, monkeypatch):
    config = tiny_config()
    committed_at_epoch_line = []  # the checkpoint folders on disk as the epoch's line is written
    info = MetricsLog.info

    def spy(log, message):
        if message.startswith("epoch "):
            committed_at_epoch_line.append(sorted(p.name for p in (tmp_path / "checkpoints").iterdir()))
        info(log, message)

    monkeypatch.setattr(MetricsLog, "info", spy)
    with tfds.testing.mock_data(num_examples=48):
        final = train.train_and_evaluate(config, str(tmp_path))
    assert committed_at_epoch_line == [["3"]]  # the epoch's checkpoint, whole, before its line
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ("step", "epoch", "train/loss", "train/top1", "train/top5", "learning_rate",
                "val/loss", "val/top1", "val/top5", "test/loss", "test/top1", "test/top5"):
        assert key in keys, key
    assert [r["step"] for r in records if "train/loss" in r] == [2, 3]  # 48 // 16 = 3 steps
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 16
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_params"] == final["num_params"] > 0
    assert 0.0 <= summary["test/top1"] <= summary["test/top5"] <= 1.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eight_devices_match_one_device(tiny_config):
    assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
    config = tiny_config()
    batches = random_batches(3)
    one_losses, one_eval = run_steps(config, train.create_mesh(jax.devices()[:1]), batches)
    eight_losses, eight_eval = run_steps(config, train.create_mesh(), batches)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=2e-5)
    assert one_losses[2] != one_losses[0]  # the steps did update the model
    np.testing.assert_allclose(eight_eval["loss"], one_eval["loss"], rtol=2e-5)


def test_evaluation_counts_every_example_once(tiny_config):
    config = tiny_config()
    with tfds.testing.mock_data(num_examples=37):  # 37 = 2 full batches of 16 + 5
        split = data.load_split(config.dataset, "test")
        batches = list(data.eval_batches(split, 16))
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 5]
    assert all(len(b["labels"]) == 16 for b in batches)  # padded: one compiled shape
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    assert len(labels) == 37

    # The masked metric sums ignore whatever sits in the padding.
    logits = jax.nn.one_hot(jnp.array([1, 2, 3, 0]), 10)
    labels = jnp.array([1, 2, 0, 0])
    mask = jnp.array([True, True, True, False])  # the last example is padding
    sums = train.metric_sums(logits, labels, jnp.ones(4), mask)
    assert float(sums["count"]) == 3 and float(sums["top1"]) == 2 and float(sums["loss"]) == 3


def test_learning_rate_schedule_corners(tiny_config):
    cfg = tiny_config().optimizer  # warm-up over 15%, peak 1e-3, cosine to 0
    schedule = optimizer.create_learning_rate_fn(cfg, total_steps=1000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(75)), 0.5e-3, rtol=1e-6)  # half-way up
    np.testing.assert_allclose(float(schedule(150)), 1e-3, rtol=1e-6)  # peak at 15%
    np.testing.assert_allclose(float(schedule(575)), 0.5e-3, rtol=1e-5)  # half-way down
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
    cfg.schedule = "constant"
    constant = optimizer.create_learning_rate_fn(cfg, total_steps=1000)
    assert float(constant(0)) == float(constant(999)) == 1e-3


@pytest.mark.parametrize("mode, factor", [("per_step", 1 - 1e-2), ("lr_scaled", 1 - 0.5 * 1e-2)])
def test_weight_decay_conventions(tiny_config, mode, factor):
    cfg = tiny_config().optimizer
    cfg.weight_decay, cfg.weight_decay_mode, cfg.eps = 1e-2, mode, 1e-7
    tx = optimizer.create_optimizer(cfg, optax.constant_schedule(0.5))
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)  # no gradient: decay only
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], factor, rtol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_the_run(tmp_path, tiny_config):
    config = tiny_config(**{"optimizer.learning_rate": 1e30, "optimizer.schedule": "constant",
                            "log_every_steps": 1})
    with tfds.testing.mock_data(num_examples=64), pytest.raises(train.TrainingDiverged,
                                                                  match="loss is nan"):
        train.train_and_evaluate(config, str(tmp_path))


# The first train step's loss of each tutorial model at its full size and its experiment's recipe
# (seed, augmentation, dropout: everything but the data), on 8 random 32x32 images. Computed by
# attn_jax before and after the redesign that moved the speed code into attn_jax/fast: the same for
# PatchConvNet and the ViT; EANet's changed once, when its attention dropout became an `nn.Dropout`
# of its own (another key for the same kind of mask; without dropout both give 5.150458).
GOLDEN_FIRST_LOSS = {"patch_convnet": 4.113959, "eanet": 5.070109, "vit": 5.037621}


@pytest.mark.slow
@pytest.mark.parametrize("name", GOLDEN_FIRST_LOSS)
def test_first_step_loss_is_the_golden_one(name):
    config = load_experiment(name)
    mesh = train.create_mesh()
    model = registry.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    tx = optimizer.create_optimizer(config.optimizer,
                                optimizer.create_learning_rate_fn(config.optimizer, 1000))
    state = create_train_state(model, tx, jax.random.key(config.seed), (size, size, 3), mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "labels": rng.integers(0, config.dataset.num_classes, 8).astype(np.int32),
             "mask": np.ones(8, bool)}
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    stats = None
    if config.preprocess.normalize == "standardize":
        stats = {"mean": jnp.full((3,), 120.0), "std": jnp.full((3,), 60.0)}
    _, sums = train.jit_train_step(config, mesh)(state, batch, jax.random.key(1), stats)
    loss = float(sums["loss"]) / float(sums["count"])
    assert loss == pytest.approx(GOLDEN_FIRST_LOSS[name], rel=1e-5)


# The EANet experiment and its ViT baseline train, standardising their inputs with the statistics
# they compute and cache.

def tiny_eanet_config(attention: str):
    """The CIFAR-100 experiment shrunk for tests: 16x16 inputs, 16 tokens, one block, one epoch."""
    config = load_experiment("eanet")
    config.batch_size = config.eval_batch_size = 16
    config.num_epochs = 1
    config.log_every_steps = 2
    config.preprocess.size = config.preprocess.train_resize = 16
    config.model.update(dict(patch_size=4, dim=16, mlp_dim=16, num_heads=2, dim_coefficient=2,
                             num_blocks=1, memory_slots=8, attention=attention))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["external", "self"])
def test_train_steps_under_mock_data(tmp_path, attention):
    config = tiny_eanet_config(attention)
    assert config.preprocess.normalize == "standardize" and config.preprocess.zoom > 0
    with tfds.testing.mock_data(num_examples=48):  # 3 steps of 16
        final = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(final["train/loss"]) and 0.0 <= final["test/top1"] <= 1.0
    cached = json.loads((tmp_path / "normalization.json").read_text())
    stats = cached["cifar100/train[:40000]"]
    assert len(stats["mean"]) == len(stats["std"]) == 3
    assert all(0 < m < 255 for m in stats["mean"]) and all(s > 0 for s in stats["std"])


def _files(workdir):
    """Every path under `workdir`, with the bytes of each file (None for a folder)."""
    return {p: p.read_bytes() if p.is_file() else None for p in workdir.rglob("*")}


def test_a_refused_launch_makes_no_workdir(tmp_path):
    """EANet standardises with statistics cached in the workdir: a launch refused at start-up (here
    its config.init_from holds no checkpoint) leaves no workdir, nor the folders on its way."""
    config = with_overrides(tiny_eanet_config("external"), {"init_from": str(tmp_path)})
    with tfds.testing.mock_data(num_examples=48), pytest.raises(
            UserError, match="neither a workdir with checkpoints"):
        train.train_and_evaluate(config, str(tmp_path / "new" / "run"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_refused_relaunch_writes_nothing_into_the_run(tmp_path):
    """A workdir holding another run (here another learning rate, resumable from its checkpoint):
    relaunching there, or evaluating it with another model, is refused and leaves every file as it
    was (no normalization.json of the refused config)."""
    config = tiny_eanet_config("external")
    other = tmp_path / "other"
    with tfds.testing.mock_data(num_examples=48):
        run = train.build_run(config, train.create_mesh(), other)
        assert not other.exists()  # building a run writes nothing
        ckpt = checkpoint.Checkpointer(other, keep=3)
        ckpt.save(run.state, train.zero_sums(run.mesh), run.description)
        ckpt.close()
        changed = with_overrides(config.copy_and_resolve_references(),
                                 {"optimizer.learning_rate": 5e-3})
        run_record.check_and_record(other, changed, run.mesh, resuming=False)
        before = _files(other)
        with pytest.raises(UserError, match="holds another run"):
            train.train_and_evaluate(config, str(other))
        with pytest.raises(UserError, match="different model"):
            modes.evaluate_checkpoint(with_overrides(changed, {"model.dim": 24}), str(other),
                                      "latest")
    assert _files(other) == before and not (other / "normalization.json").exists()


@pytest.mark.parametrize("resident_limit_mib", [None, 0], ids=["resident", "streamed"])
def test_k_steps_in_one_call_equal_k_calls(tmp_path, tiny_config, resident_limit_mib):
    config = tiny_config(**{"dataset.resident_limit_mib": resident_limit_mib})
    with tfds.testing.mock_data(num_examples=64):  # 4 steps of 16 per epoch
        run = train.build_run(config, train.create_mesh(), tmp_path)
        run.start_feed()
    assert run.feed.resident == (resident_limit_mib is None)
    initial = jax.device_get(run.state)

    def train_epoch(sizes):
        run.state = jax.device_put(initial, NamedSharding(run.mesh, PartitionSpec()))
        sums = train.zero_sums(run.mesh)
        for n, inputs in zip(sizes, run.feed.epoch(0, 0, sizes), strict=True):
            run.state, sums = run.compiled_train_call(n)(run.state, sums, inputs, run.train_key,
                                                         run.stats)
        return jax.device_get((run.state.params, sums))

    (one_params, one_sums), (four_params, four_sums) = train_epoch([1] * 4), train_epoch([4])
    assert int(run.state.step) == 4
    # Not bitwise: XLA compiles the 4 steps as one program and fuses across their boundaries
    # (looped or unrolled), so a few float roundings differ; Adam's normalised update turns last-bit
    # gradient differences of near-zero gradients into parameter differences of up to ~3e-5
    # (measured 6e-6 to 2.9e-5, looped or unrolled, 1 or 8 devices), against updates of ~4e-3.
    moved, differ = (max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
        for x, y in ((initial.params, one_params), (one_params, four_params)))
    assert differ < 1e-4 and moved > 30 * differ
    np.testing.assert_allclose(four_sums["loss"], one_sums["loss"], rtol=1e-6)
    assert four_sums["top1"] == one_sums["top1"] and float(one_sums["count"]) == 64


def test_unroll_steps_auto_unrolls_on_cpu_only(tiny_config):
    assert train.unroll_steps("auto") is (jax.default_backend() == "cpu")
    assert train.unroll_steps("loop") is False and train.unroll_steps("unroll") is True
    with pytest.raises(UserError, match="config.unroll_steps is 'yes': use one of 'auto', 'unroll', "
                                        "'loop'"):
        validate.check(tiny_config(unroll_steps="yes"))  # the one gate: unroll_steps trusts it


def test_bfloat16_computes_in_bfloat16_with_float32_parameters_and_loss(tiny_config):
    config = tiny_config(dtype="bfloat16")
    model = registry.create_model(config, 10)
    mesh = train.create_mesh()
    tx = optimizer.create_optimizer(config.optimizer, optimizer.create_learning_rate_fn(config.optimizer, 10))
    state = create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    logits, attention = jax.eval_shape(
        lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 3)), train=False), state.params)
    assert logits.dtype == attention.dtype == jnp.float32  # float32 softmax and logits
    train_fn = train.jit_train_step(config, mesh)
    batch = steps.synthetic_batch(16, (32, 32, 3), 10, mesh)
    lowered = train_fn.lower(state, batch, jax.random.key(1), None)
    assert "xbf16>" in lowered.as_text()  # the convolutions and matmuls run in bfloat16
    new_state, sums = lowered.compile()(state, batch, jax.random.key(1), None)
    assert sums["loss"].dtype == jnp.float32 and bool(jnp.isfinite(sums["loss"]))
    assert {p.dtype for p in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert registry.compute_dtype("auto") == jnp.float32  # on CPU


# The optimizer side of the modern stack: gradient clipping, LAMB, gradient accumulation, and the
# EMA of the parameters.

def _optimizer_config(tiny_config, **fields):
    cfg = tiny_config().optimizer
    cfg.update(weight_decay_mode="lr_scaled", **fields)
    return cfg


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_clipping_gives_the_optimizer_the_gradient_scaled_to_the_bound(tiny_config, name):
    """With clip_grad_norm 1, a gradient of global norm 50 updates as the same gradient divided by
    50, and one of norm 0.5 as itself (two steps: Adam's moments remember the first)."""
    params = {"a": jnp.ones(3), "b": jnp.full((2, 2), 0.5)}
    big = {"a": jnp.array([30.0, -40.0, 0.0]), "b": jnp.zeros((2, 2))}  # global norm 50
    small = {"a": jnp.array([0.3, 0.0, 0.4]), "b": jnp.zeros((2, 2))}  # global norm 0.5

    def two_updates(cfg, grads):
        tx = optimizer.create_optimizer(cfg, optax.constant_schedule(0.1))
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    clipped = two_updates(_optimizer_config(tiny_config, name=name, clip_grad_norm=1.0),
                          [big, small])
    by_hand = two_updates(_optimizer_config(tiny_config, name=name, clip_grad_norm=0.0),
                          [jax.tree.map(lambda g: g / 50.0, big), small])
    unclipped = two_updates(_optimizer_config(tiny_config, name=name, clip_grad_norm=0.0),
                            [big, small])
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(clipped["a"], unclipped["a"], rtol=1e-4)  # the clip changed something


def test_lamb_first_step_by_hand(tiny_config):
    """LAMB's first update (You et al. 2020, Algorithm 2): Adam's bias-corrected m / (sqrt(v) + eps)
    is g / (|g| + eps); weight decay is added where the mask allows; each leaf is scaled by the
    trust ratio ||p|| / ||u||, then by -lr."""
    lr, wd, eps = 0.1, 0.01, 1e-6
    cfg = _optimizer_config(tiny_config, name="lamb", weight_decay=wd, eps=eps,
                            weight_decay_exclude=("cls_token",))
    params = {"w": jnp.array([[1.0, 2.0], [2.0, -1.0]]), "cls_token": jnp.array([0.5, -0.5, 1.0])}
    grads = {"w": jnp.array([[0.1, -0.2], [0.3, 0.05]]), "cls_token": jnp.array([1.0, 2.0, -3.0])}
    tx = optimizer.create_optimizer(cfg, optax.constant_schedule(lr))
    updates, _ = tx.update(grads, tx.init(params), params)
    for name, decayed in (("w", True), ("cls_token", False)):
        p, g = np.asarray(params[name], np.float64), np.asarray(grads[name], np.float64)
        u = g / (np.abs(g) + eps) + (wd * p if decayed else 0.0)
        expected = -lr * np.linalg.norm(p) / np.linalg.norm(u) * u
        np.testing.assert_allclose(updates[name], expected, rtol=1e-6)


def test_lamb_with_per_step_decay_is_refused(tiny_config):
    config = tiny_config(**{"optimizer.name": "lamb", "optimizer.weight_decay_mode": "per_step"})
    with pytest.raises(UserError, match=r"^config.optimizer.weight_decay_mode is 'per_step': LAMB"):
        validate.check(config)


def _one_step(config, mesh, batch):
    """(parameters, metric sums) after one train step of `config` on `batch` from a fixed state."""
    model = registry.create_model(config, 10)
    tx = optimizer.create_optimizer(config.optimizer,
                                optimizer.create_learning_rate_fn(config.optimizer, 10))
    state = create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh,
                                     ema=config.ema.decay > 0)
    initial = jax.device_get(state)
    state, sums = train.jit_train_step(config, mesh)(state, data.to_global(batch, mesh),
                                                     jax.random.key(1), None)
    return initial, jax.device_get(state), jax.device_get(sums)


@pytest.mark.parametrize("k, devices", [(2, 8), (4, 1)])
def test_accumulated_micro_batches_give_the_update_of_the_whole_batch(tiny_config, k, devices):
    """k micro-batches of 16 / k and one batch of 16 give the same parameters after a step, to float
    tolerance. Dropout off (each micro-batch draws its own masks); crop and flip on: the whole batch
    is augmented, one key per example, before it is split, so every example sees the same pixels."""
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             "labels": rng.integers(0, 10, 16).astype(np.int32), "mask": np.ones(16, bool)}
    off = {"model.attention_dropout": 0.0, "model.mlp_dropout": 0.0,
           "optimizer.schedule": "constant"}
    initial, whole, whole_sums = _one_step(tiny_config(**off), train.create_mesh(), batch)
    _, micro, micro_sums = _one_step(tiny_config(**off, accumulate_steps=k),
                                     train.create_mesh(jax.devices()[:devices]), batch)
    assert int(micro.step) == int(whole.step) == 1  # one optimizer update
    moved, differ = (max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
        for x, y in ((initial.params, whole.params), (whole.params, micro.params)))
    # Adam's first update is lr * g / (|g| + eps): last-bit differences of near-zero gradients
    # (another summation order) move a parameter by up to lr, so the bound is loose on purpose.
    assert moved > 100 * differ
    np.testing.assert_allclose(micro_sums["loss"], whole_sums["loss"], rtol=1e-5)
    assert micro_sums["top1"] == whole_sums["top1"] and micro_sums["count"] == 16


def test_a_batch_that_does_not_split_into_micro_batches_is_refused(tiny_config):
    with pytest.raises(UserError, match=r"^config.accumulate_steps is 3: it must divide "
                                        r"config.batch_size \(16\)"):
        validate.check(tiny_config(accumulate_steps=3))
    with pytest.raises(UserError, match=r"^config.batch_size 16 does not split into "
                                        r"config.accumulate_steps=4 micro-batches over 8 devices: "
                                        r"use a multiple of 32$"):
        optimizer.check_accumulation(16, 4, train.create_mesh())


def test_ema_update_by_hand(tiny_config):
    """ema <- d * ema + (1 - d) * params after update t (0 for the first), d = decay, or with the
    warm-up min(decay, (1 + t) / (10 + t))."""
    cfg = tiny_config().ema
    cfg.decay = 0.99
    params, ema = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([3.0, 5.0])}
    state = EmaTrainState(step=jnp.array(1), apply_fn=None, params=params, tx=None,
                                opt_state=(), ema_params=ema)
    for warmup, step, d in ((False, 1, 0.99), (True, 1, 0.1), (True, 81, 0.9),
                            (True, 2000, 0.99)):
        cfg.warmup = warmup
        new = update_ema(state.replace(step=jnp.array(step)), cfg).ema_params["w"]
        np.testing.assert_allclose(new, d * np.array([3.0, 5.0]) + (1 - d) * np.array([1.0, -2.0]),
                                   rtol=1e-6)


def test_ema_follows_the_train_step_and_is_absent_when_off(tiny_config):
    """With EMA on, one step leaves ema = d * initial + (1 - d) * new parameters; with it off the
    state is the plain TrainState of earlier runs (same tree, so their checkpoints restore)."""
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             "labels": rng.integers(0, 10, 16).astype(np.int32), "mask": np.ones(16, bool)}
    config = tiny_config(**{"ema.decay": 0.9, "optimizer.schedule": "constant"})
    initial, state, _ = _one_step(config, train.create_mesh(), batch)
    for i, p, e in zip(jax.tree.leaves(initial.params), jax.tree.leaves(state.params),
                       jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_allclose(e, 0.9 * i + 0.1 * p, rtol=1e-5, atol=1e-7)
    off = _one_step(tiny_config(), train.create_mesh(), batch)[1]
    assert type(off) is TrainState and not has_ema(off)


def test_the_loop_waits_for_each_call_before_the_last_one_dispatched():
    """A SIGTERM waits for at most the running call and one queued behind it, not for every call
    up to the next log line (asynchronous dispatch would queue them all)."""
    waited = []

    class Step:  # a step counter as a dispatched call returns it
        def __init__(self, call):
            self.call = call

        def __add__(self, other):
            return Step(self.call)

        def block_until_ready(self):
            waited.append(self.call)

    queue = DispatchQueue()
    for call in range(4):
        queue.dispatched(Step(call))
        assert waited == list(range(call))  # every call before this one is finished
