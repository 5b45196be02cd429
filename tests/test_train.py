"""The training harness end to end under tfds.testing.mock_data, on 8 fake CPU devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from attn_jax import data, models, train
from attn_jax.errors import UserError


@pytest.mark.slow
def test_train_and_evaluate_writes_every_output(tmp_path, tiny_config):
    config = tiny_config()
    with tfds.testing.mock_data(num_examples=48):
        final = train.train_and_evaluate(config, str(tmp_path))
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


def _run_steps(config, mesh, batches):
    """Losses of consecutive train steps on `mesh`, from the same initial state."""
    model = models.create_model(config, 10)
    schedule = train.create_learning_rate_fn(config.optimizer, 10)
    tx = train.create_optimizer(config.optimizer, schedule)
    state = train.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
    train_fn, eval_fn = train.jit_steps(config, mesh)
    losses = []
    for batch in batches:
        state, sums = train_fn(state, data.to_global(batch, mesh), jax.random.key(1), None)
        losses.append(float(sums["loss"]) / float(sums["count"]))
    final_eval = train.means(eval_fn(state, data.to_global(batches[0], mesh), None))
    return losses, final_eval


def test_eight_devices_match_one_device(tiny_config):
    assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
    config = tiny_config()
    rng = np.random.default_rng(0)
    batches = [{"images": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                "labels": rng.integers(0, 10, 16).astype(np.int32),
                "mask": np.ones(16, bool)} for _ in range(3)]
    one_losses, one_eval = _run_steps(config, train.create_mesh(jax.devices()[:1]), batches)
    eight_losses, eight_eval = _run_steps(config, train.create_mesh(), batches)
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
    schedule = train.create_learning_rate_fn(cfg, total_steps=1000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(75)), 0.5e-3, rtol=1e-6)  # half-way up
    np.testing.assert_allclose(float(schedule(150)), 1e-3, rtol=1e-6)  # peak at 15%
    np.testing.assert_allclose(float(schedule(575)), 0.5e-3, rtol=1e-5)  # half-way down
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)
    cfg.schedule = "constant"
    constant = train.create_learning_rate_fn(cfg, total_steps=1000)
    assert float(constant(0)) == float(constant(999)) == 1e-3


@pytest.mark.parametrize("mode, factor", [("per_step", 1 - 1e-2), ("lr_scaled", 1 - 0.5 * 1e-2)])
def test_weight_decay_conventions(tiny_config, mode, factor):
    cfg = tiny_config().optimizer
    cfg.weight_decay, cfg.weight_decay_mode, cfg.eps = 1e-2, mode, 1e-7
    tx = train.create_optimizer(cfg, optax.constant_schedule(0.5))
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


def test_batch_that_does_not_divide_over_devices_is_a_clear_error(tiny_config):
    with pytest.raises(UserError, match="batch size 12 does not divide over 8 devices"):
        data.local_batch_size(12, train.create_mesh())


def test_missing_dataset_is_a_clear_error(tmp_path, tiny_config):
    config = tiny_config(**{"dataset.data_dir": str(tmp_path), "dataset.download": False})
    with pytest.raises(UserError, match=r"'cifar10' is not prepared in .*:smoke"):
        data.load_split(config.dataset, "train")


def test_unknown_model_is_a_clear_error(tiny_config):
    config = tiny_config(**{"model.name": "resnet"})
    with pytest.raises(UserError, match="unknown model name 'resnet'.*patch_convnet_tutorial"):
        models.create_model(config, 10)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_config, capsys):
    """A crash in the middle of writing metrics.jsonl leaves half a line: resuming drops it with a
    warning; an unreadable line before the end is an error naming it; JSON files are written whole."""
    from attn_jax import metrics_log

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "epoch": 1, "train/loss": 1.5}\n{"step": 4, "epo')
    log = metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)
    log.write(4, 1, {"train/loss": 1.25})
    log.close()
    assert "dropped the torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert not list(tmp_path.glob(".*.tmp*"))  # config.json written through a renamed temp file
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 16

    path.write_text('{"step": 2, "epo\n{"step": 4, "epoch": 1}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 1 is not JSON"):
        metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)


# The first train step's loss of each tutorial model at its full size and its experiment's recipe
# (seed, augmentation, dropout: everything but the data), on 8 random 32x32 images. Computed by
# attn_jax before and after the redesign that moved the speed code into attn_jax/fast: the same for
# PatchConvNet and the ViT; EANet's changed once, when its attention dropout became an `nn.Dropout`
# of its own (another key for the same kind of mask; without dropout both give 5.150458).
GOLDEN_FIRST_LOSS = {"patch_convnet": 4.113959, "eanet": 5.070109, "vit": 5.037621}


@pytest.mark.slow
@pytest.mark.parametrize("name", GOLDEN_FIRST_LOSS)
def test_first_step_loss_is_the_golden_one(name):
    from conftest import load_experiment
    from jax.sharding import NamedSharding, PartitionSpec

    config = load_experiment(name)
    mesh = train.create_mesh()
    model = models.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    tx = train.create_optimizer(config.optimizer,
                                train.create_learning_rate_fn(config.optimizer, 1000))
    state = train.create_train_state(model, tx, jax.random.key(config.seed), (size, size, 3), mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             "labels": rng.integers(0, config.dataset.num_classes, 8).astype(np.int32),
             "mask": np.ones(8, bool)}
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    stats = None
    if config.preprocess.normalize == "standardize":
        stats = {"mean": jnp.full((3,), 120.0), "std": jnp.full((3,), 60.0)}
    _, sums = train.jit_steps(config, mesh)[0](state, batch, jax.random.key(1), stats)
    loss = float(sums["loss"]) / float(sums["count"])
    assert loss == pytest.approx(GOLDEN_FIRST_LOSS[name], rel=1e-5)
