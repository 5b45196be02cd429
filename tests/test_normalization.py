"""attn_jax/normalization.py: per-channel statistics of a split, cached per split (by the caller, once
it may write), on 1 or 2 processes."""

import json

import numpy as np

from attn_jax import data, normalization


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
    assert not path.exists()  # computing writes nothing: the run caches them once it may write
    normalization.cache(path, "toy/train[:5]", first)
    assert list(json.loads(path.read_text())) == ["toy/train[:5]"]
    written = path.stat().st_mtime_ns
    normalization.cache(path, "toy/train[:5]", first)
    assert path.stat().st_mtime_ns == written  # there already: not written again

    def must_not_run(_):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(normalization, "compute_channel_stats", must_not_run)
    again = normalization.channel_stats(split, path, key="toy/train[:5]")
    for name in ("mean", "std"):
        np.testing.assert_array_equal(again[name], first[name])  # bit-exact through JSON

    other = {"mean": np.ones(3), "std": np.full(3, 2.0)}
    monkeypatch.setattr(normalization, "compute_channel_stats", lambda _: other)
    assert normalization.channel_stats(split, path, key="toy/train[:4]") is other  # recomputed
    normalization.cache(path, "toy/train[:4]", other)
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
    computed = normalization.channel_stats(split, path, key="toy")  # process 0, no cache
    normalization.cache(path, "toy", computed)
    assert path.exists()
    read = normalization.channel_stats(split, path, key="toy")  # process 0, cache hit
    for name in ("mean", "std"):
        np.testing.assert_allclose(computed[name], expected[name], rtol=1e-12)
        np.testing.assert_array_equal(read[name], computed[name])
    monkeypatch.setattr(normalization.jax, "process_index", lambda: 1)
    (tmp_path / "other").mkdir()
    normalization.cache(tmp_path / "other" / "n.json", "toy", computed)
    assert not (tmp_path / "other" / "n.json").exists()  # only process 0 writes
