"""Per-channel mean and standard deviation of the training split, for normalize == "standardize".

The EANet tutorial adapts a Keras `Normalization` layer to the training images; this module gives
the same statistics without hard-coding them: one streaming pass over the split's raw uint8 pixels
(float64 sums, exact for uint8 data), the population variance (ddof=0, as `Normalization.adapt`)
and the std floored at Keras' epsilon 1e-7, as `Normalization` divides by
max(sqrt(variance), 1e-7).

The result is cached as JSON in `cache_path` (the run's `DIR/normalization.json`), one entry per
`key` (dataset name and split string), so a run on another split recomputes. `channel_stats` only
reads the cache; `cache` writes it, which a training run does once nothing can refuse its launch
any more (a refused launch writes nothing into the workdir). In a multi-process run every process
reads only its shard: the shards' sums are gathered (bit-exact) so that every process gets the same
statistics, process 0 decides whether its cache holds them and is the only writer.
"""

import json
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from attn_jax import atomic, data

KERAS_EPSILON = 1e-7
Stats = dict[str, np.ndarray]


def cache_key(dataset: str, split: str) -> str:
    """The cache entry of a dataset's split: "cifar100/train[:40000]"."""
    return f"{dataset}/{split}"


def channel_stats(split: data.Split, cache_path: Path, *, key: str) -> Stats:
    """{"mean": float64 [C], "std": float64 [C]} of `split`'s raw pixels (0..255), over the whole
    split in every process; read from `cache_path` under `key` when there, else computed (and not
    written: `cache` writes them)."""
    cache_path = Path(cache_path)
    cached = _read_cache(cache_path).get(key) if jax.process_index() == 0 else None
    if jax.process_count() > 1:  # every process must take the same branch: process 0's
        if multihost_utils.broadcast_one_to_all(np.int32(cached is not None)):
            channels = split.image_shape[-1]
            local = (np.concatenate([cached["mean"], cached["std"]]) if cached is not None
                     else np.zeros(2 * channels))
            both = _view_float64(multihost_utils.broadcast_one_to_all(_view_uint32(local)))
            return {"mean": both[:channels], "std": both[channels:]}
    elif cached is not None:
        return {"mean": np.asarray(cached["mean"], np.float64),
                "std": np.asarray(cached["std"], np.float64)}
    return compute_channel_stats(split)


def cache(cache_path: Path, key: str, stats: Stats) -> None:
    """Adds `stats` to the cache `cache_path` under `key` (process 0; nothing written when the
    entry is there already)."""
    entry = {name: [float(v) for v in values] for name, values in stats.items()}
    if jax.process_index() == 0 and _read_cache(Path(cache_path)).get(key) != entry:
        _write_cache(Path(cache_path), key, entry)


def compute_channel_stats(split: data.Split, batch_size: int = 1024) -> Stats:
    """One pass over `split` (this process's shard, the others' gathered): mean and std per
    channel of the raw pixel values, population variance, std floored at 1e-7."""
    channels = split.image_shape[-1]
    sums = np.zeros(1 + 2 * channels)  # an empty shard still joins the gather
    shard = data.local_shard(split.num_examples)
    for images, _ in data.read_batches(split, np.array_split(shard, max(1, len(shard) // batch_size))):
        x = images.astype(np.float64).reshape(-1, channels)  # [pixels, C]
        sums += np.concatenate([[len(x)], x.sum(0), np.square(x).sum(0)])
    if jax.process_count() > 1:
        sums = _view_float64(multihost_utils.process_allgather(_view_uint32(sums))).sum(0)
    count, (total, squares) = sums[0], np.split(sums[1:], 2)
    if count == 0:
        raise ValueError("cannot compute normalisation statistics of an empty split")
    mean = total / count
    variance = np.maximum(squares / count - np.square(mean), 0.0)
    return {"mean": mean, "std": np.maximum(np.sqrt(variance), KERAS_EPSILON)}


def _view_uint32(x: np.ndarray) -> np.ndarray:
    """float64 [..., n] as uint32 [..., 2n], so JAX collectives without x64 move it bit-exactly."""
    return np.ascontiguousarray(x, np.float64).view(np.uint32)


def _view_float64(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), np.uint32).view(np.float64)


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: recompute
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Adds (or replaces) the entry `key`, atomically: a reader never sees half a file."""
    entries = _read_cache(path)
    entries[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(entries, indent=1) + "\n")
