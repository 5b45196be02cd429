"""EANet and its ViT baseline through the harness: experiment configs, training, normalisation stats."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_experiment

from attn_jax import data, models, normalization, summary, train


@pytest.mark.parametrize("experiment, expected", [("eanet", 361_380), ("vit", 623_268)])
def test_experiment_parameter_counts(experiment, expected):
    config = load_experiment(experiment)
    model = models.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    assert summary.total_params(model, (size, size, 3)) == expected


def test_vit_differs_from_eanet_only_in_attention():
    eanet, vit = load_experiment("eanet").to_dict(), load_experiment("vit").to_dict()
    assert (eanet["model"].pop("attention"), vit["model"].pop("attention")) == ("external", "self")
    assert vit == eanet


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


# Normalisation statistics.

def _toy_split(seed=0, n=5):
    """n random 4x4 RGB uint8 images whose last channel is constant (std 0: floored at 1e-7)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    images[..., 2] = 7
    return data.Split("toy", data.Arrays(images, np.zeros(n, np.int32)), (4, 4, 3), 0), images


def test_channel_stats_values():
    split, images = _toy_split()
    stats = normalization.compute_channel_stats(split, batch_size=2)  # 3 uneven batches
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"][:2], pixels.std(0)[:2], rtol=1e-12)  # population std
    assert stats["mean"][2] == 7.0 and stats["std"][2] == normalization.KERAS_EPSILON


def test_channel_stats_cache_is_written_reread_and_keyed_by_split(tmp_path, monkeypatch):
    split, images = _toy_split()
    path = tmp_path / "normalization.json"
    first = normalization.channel_stats(split, path, key="toy/train[:5]")
    assert list(json.loads(path.read_text())) == ["toy/train[:5]"]

    def must_not_run(_):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(normalization, "compute_channel_stats", must_not_run)
    again = normalization.channel_stats(split, path, key="toy/train[:5]")
    for name in ("mean", "std"):
        np.testing.assert_array_equal(again[name], first[name])  # bit-exact through JSON

    other = {"mean": np.ones(3), "std": np.full(3, 2.0)}
    monkeypatch.setattr(normalization, "compute_channel_stats", lambda _: other)
    assert normalization.channel_stats(split, path, key="toy/train[:4]") is other  # recomputed
    assert set(json.loads(path.read_text())) == {"toy/train[:5]", "toy/train[:4]"}


def test_channel_stats_two_processes(tmp_path, monkeypatch):
    """The multi-process branches, simulated: two processes with identical shards (so the same
    statistics as one); process 1 takes process 0's decision and values and never writes."""
    split, _ = _toy_split()
    expected = normalization.compute_channel_stats(split)
    monkeypatch.setattr(normalization.jax, "process_count", lambda: 2)
    monkeypatch.setattr(normalization.data, "local_shard", np.arange)  # both read every example
    monkeypatch.setattr(normalization.multihost_utils, "process_allgather",
                        lambda x: np.stack([x, x]))
    monkeypatch.setattr(normalization.multihost_utils, "broadcast_one_to_all", lambda x: x)
    path = tmp_path / "normalization.json"
    computed = normalization.channel_stats(split, path, key="toy")  # process 0, no cache: writes
    assert path.exists()
    read = normalization.channel_stats(split, path, key="toy")  # process 0, cache hit
    for name in ("mean", "std"):
        np.testing.assert_allclose(computed[name], expected[name], rtol=1e-12)
        np.testing.assert_array_equal(read[name], computed[name])
    monkeypatch.setattr(normalization.jax, "process_index", lambda: 1)
    (tmp_path / "other").mkdir()
    normalization.channel_stats(split, tmp_path / "other" / "n.json", key="toy")
    assert not (tmp_path / "other" / "n.json").exists()  # only process 0 writes
