"""The input pipeline alone, and training fed by each feed against a synthetic resident batch."""

import copy
import statistics
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from attn_jax import data, train
from attn_jax.metrics import zero_sums


def offline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.dataset with download switched off: the benchmark never downloads."""
    dataset = copy.deepcopy(config.dataset)
    with dataset.unlocked():
        dataset.download = False
    return dataset


def time_pipeline(feed: data.StreamedFeed, batches: int) -> dict:
    """Images/s of the streamed input pipeline alone (grain reads and decodes, batches put on the
    mesh, nothing stepping), over `batches` batches of epoch 0, and the seconds to the first."""
    start = time.perf_counter()
    first, count = None, 0
    for batch in feed.epoch(0, 0, [1] * min(batches, feed.steps_per_epoch)):
        jax.block_until_ready(batch)
        first = time.perf_counter() if first is None else first
        count += 1
    end = time.perf_counter()
    return {"batches": count, "first_batch_s": first - start,
            "images_per_s": (count - 1) * feed.global_batch / (end - first) if count > 1 else None}


def synthetic_feed(size: int, image_shape, num_classes: int, mesh, seed: int = 0) -> dict:
    """A resident feed's input whose split is one batch of `size` random images (order [1, size]:
    0..size-1, the same in every process): every step of the run's own jitted call gathers that
    same batch."""
    rng = np.random.default_rng(seed)
    return {"images": data.replicated(rng.integers(0, 256, (size, *image_shape), dtype=np.uint8), mesh),
            "labels": data.replicated(rng.integers(0, num_classes, size).astype(np.int32), mesh),
            "order": data.replicated(np.arange(size, dtype=np.int32).reshape(1, size), mesh)}


def compare_feeds(config: ml_collections.ConfigDict, mesh, state, train_key, stats,
                  split: data.Split, opts: dict) -> tuple[dict, object]:
    """Training as a run trains (`train.jit_train_call`, config.steps_per_call steps per call) fed
    by the device-resident split, by the streamed pipeline and by a synthetic resident batch, in
    `rounds` alternating rounds of about `compare_steps` steps each; the medians and their ratios."""
    k = config.steps_per_call
    steps_per_epoch = data.steps_per_epoch(split.num_examples, config.batch_size)
    # Each round reads one epoch of each feed: at most its steps, one call of them untimed.
    calls = min(max(1, opts["compare_steps"] // k), steps_per_epoch // k - 1)
    if calls < 1:
        return {"skipped": f"an epoch of {steps_per_epoch} steps is too short for 2 calls of "
                           f"{k} steps"}, state
    calls_of = {feed: train.jit_train_call(config, mesh, k, feed)
                for feed in (data.ResidentFeed, data.StreamedFeed)}
    start = time.perf_counter()
    feeds = {"streamed": data.StreamedFeed(split, mesh, config.batch_size, config.seed,
                                           config.dataset.prefetch)}
    report = {"steps_per_call": k, "steps": calls * k, "rounds": opts["rounds"]}
    if data.is_resident(split, config.dataset, mesh):
        feeds["resident"] = data.ResidentFeed(split, mesh, config.batch_size, config.seed)
        report["resident_load_s"] = time.perf_counter() - start  # decode + put on the devices
    sums = zero_sums(mesh)
    rates = {name: [] for name in ("synthetic", *feeds)}
    synthetic = synthetic_feed(config.batch_size, split.image_shape, config.dataset.num_classes,
                               mesh)

    def timed(name: str, inputs: Iterator[dict], call: Callable) -> None:
        nonlocal state, sums
        state, sums = call(state, sums, next(inputs), train_key, stats)  # untimed
        jax.block_until_ready(state)
        begin = time.perf_counter()
        for call_input in inputs:
            state, sums = call(state, sums, call_input, train_key, stats)
        jax.block_until_ready(state)
        rates[name].append(calls * k * config.batch_size / (time.perf_counter() - begin))

    for r in range(opts["rounds"]):
        timed("synthetic", iter([synthetic] * (calls + 1)), calls_of[data.ResidentFeed])
        for name, feed in feeds.items():
            timed(name, feed.epoch(r, 0, [k] * (calls + 1)), calls_of[type(feed)])
    for name, values in rates.items():
        report[f"{name}_images_per_s"] = statistics.median(values)
        report[f"{name}_all"] = values
    for name in feeds:
        report[f"{name}_ratio"] = report[f"{name}_images_per_s"] / report["synthetic_images_per_s"]
    return report, state
