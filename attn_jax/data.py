"""Host input pipeline: tfds splits -> shuffled uint8 batches -> global arrays on the device mesh.

The host only decodes, shuffles, batches uint8 pixels and prefetches; every resize, crop, flip or
normalisation runs on the device (`attn_jax.preprocess`). Each process reads its own shard of every
split, so the same code serves one device, eight, or a multi-host slice.

Training order is a pure function of (seed, epoch): epoch `e` shuffles with seed `seed + e`, and a
resumed run skips the batches of the current epoch it has already seen, never the whole history.
Evaluation sees every example exactly once: the last batch is padded and a mask marks real examples.
"""

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import attn_jax.datasets  # noqa: F401  (registers the datasets attn_jax ships)
from attn_jax.errors import UserError

tf.config.set_visible_devices([], "GPU")  # tf.data only: keep TensorFlow off the accelerators
tfds.disable_progress_bar()

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset, as this process reads it."""

    dataset: tf.data.Dataset  # (image uint8 [H, W, C], label int32) pairs, this process's shard
    num_examples: int  # in the whole split, over all processes
    num_local_examples: int  # in this process's shard


def _builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder of `cfg.name`, prepared (downloading only if `cfg.download`)."""
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"unknown tfds dataset {cfg.name!r}: set config.dataset.name to a tfds image "
            "classification dataset (see `tfds.list_builders()`)") from None
    if builder.is_prepared():
        return builder
    where = cfg.data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
    hint = ("or run the offline smoke experiment instead: "
            "--config=experiments/patch_convnet.py:smoke")
    if not cfg.download:
        raise UserError(
            f"dataset {cfg.name!r} is not prepared in {where} and config.dataset.download is "
            f"False: prepare it there (tfds build {cfg.name} --data_dir=...), point "
            f"config.dataset.data_dir at a prepared copy, {hint}")
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001  (any download failure gets the same advice)
        reason = type(e).__name__ + (f": {str(e).splitlines()[0][:100]}" if str(e) else "")
        raise UserError(
            f"dataset {cfg.name!r} is not prepared in {where} and could not be downloaded "
            f"({reason}): prepare it on a machine with network access and point "
            f"config.dataset.data_dir at it, {hint}") from None
    return builder


def check_num_classes(cfg: ml_collections.ConfigDict) -> None:
    """config.dataset.num_classes must match the dataset's label feature."""
    actual = _builder(cfg).info.features[cfg.label_key].num_classes
    if actual != cfg.num_classes:
        raise UserError(f"config.dataset.num_classes is {cfg.num_classes} but dataset "
                        f"{cfg.name!r} has {actual} classes: set it to {actual}")


def class_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """Names of the dataset's classes, in label order."""
    return list(_builder(cfg).info.features[cfg.label_key].names)


def load_split(cfg: ml_collections.ConfigDict, split: str, process_index: int | None = None,
               process_count: int | None = None) -> Split:
    """This process's shard of `split` (a tfds split string such as "train[:40000]").

    `process_index` and `process_count` default to this process's place in the job.
    """
    builder = _builder(cfg)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    shards = tfds.even_splits(split, n=count, drop_remainder=False)
    try:
        ds = builder.as_dataset(split=shards[index], shuffle_files=False)
        total = builder.info.splits[split].num_examples if builder.info.splits else 0
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"bad split {split!r} for dataset {cfg.name!r}: {e}") from None
    ds = ds.map(lambda ex: (_fixed_size(ex[cfg.image_key], cfg.get("image_size")),
                            tf.cast(ex[cfg.label_key], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    local = int(ds.cardinality())
    if local < 0 or total == 0:  # e.g. tfds.testing.mock_data, whose splits carry no metadata
        local = int(ds.reduce(0, lambda n, _: n + 1))
        total = local * count
    if cfg.cache:
        ds = ds.cache()
    return Split(ds, total, local)


def _fixed_size(image: tf.Tensor, size: int | None) -> tf.Tensor:
    """Datasets of mixed image sizes (ImageNet) need one size to batch: config.dataset.image_size
    resizes every image to size x size uint8 on the host (bilinear); None keeps the native size."""
    if not size:
        return image
    return tf.cast(tf.round(tf.image.resize(image, (size, size), antialias=True)), tf.uint8)


def _as_batch(images, labels, mask=None) -> Batch:
    batch = {"images": images.numpy(), "labels": labels.numpy()}
    batch["mask"] = np.ones(len(labels), bool) if mask is None else mask
    return batch


def train_batches(split: Split, local_batch: int, shuffle_buffer: int, seed: int, epoch: int,
                  start: int = 0) -> Iterator[Batch]:
    """One epoch of shuffled full batches from `start` (a batch index) on; the tail is dropped.

    A `shuffle_buffer` at least the shard's size gives a uniform permutation of the epoch.
    """
    buffer = min(shuffle_buffer, split.num_local_examples)
    ds = split.dataset.shuffle(buffer, seed=seed + epoch, reshuffle_each_iteration=False)
    ds = ds.batch(local_batch, drop_remainder=True).skip(start).prefetch(2)
    for images, labels in ds:
        yield _as_batch(images, labels)


def num_eval_batches(split: Split, local_batch: int) -> int:
    """Batches every process runs over `split`: enough for the largest process shard."""
    largest_shard = math.ceil(split.num_examples / jax.process_count())
    return max(1, math.ceil(largest_shard / local_batch))


def eval_batches(split: Split, local_batch: int) -> Iterator[Batch]:
    """Every example of the shard exactly once, in order, padded to full batches with mask=False."""
    emitted = 0
    for images, labels in split.dataset.batch(local_batch).prefetch(2):
        yield _pad(_as_batch(images, labels), local_batch)
        emitted += 1
    image_shape = split.dataset.element_spec[0].shape
    while emitted < num_eval_batches(split, local_batch):  # processes with a shorter shard
        yield _empty_batch(local_batch, tuple(image_shape))
        emitted += 1


def _pad(batch: Batch, size: int) -> Batch:
    missing = size - len(batch["labels"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


def _empty_batch(size: int, image_shape: tuple[int, ...]) -> Batch:
    return {"images": np.zeros((size, *image_shape), np.uint8),
            "labels": np.zeros(size, np.int32), "mask": np.zeros(size, bool)}


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of `global_batch`; a clear error when it does not divide evenly."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise UserError(
            f"batch size {global_batch} does not divide over {devices} devices: set "
            f"config.batch_size (and config.eval_batch_size) to a multiple of {devices}")
    return global_batch // jax.process_count()


def to_global(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local batch into one global array sharded over the `data` axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[Batch], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Moves batches onto the mesh from a background thread, `size` batches ahead of the consumer.

    The transfer of batch n+1 overlaps step n, so the step never waits on the host for its input.
    A consumer that stops early (a `break`, or closing the generator) also stops the thread, which
    then releases `batches` (and the tf.data iterator and shuffle buffer behind it).
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not put(to_global(batch, mesh)):
                    return
        except Exception as e:  # noqa: BLE001  (re-raised in the consumer)
            put(e)
        put(done)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
