"""Input: tfds splits read by random access, without TensorFlow, and fed to the device mesh.

A split is read through `tfds.data_source` (datasets prepared in tfds' ArrayRecord format), which
decodes an example with numpy and PIL. The training order is one function of (seed, epoch),
`epoch_order`, whichever way the batches reach the devices:

- **device-resident** (`ResidentFeed`): a split that fits (`config.dataset.resident_limit_mib`) is
  decoded once and kept as uint8 on every device; each step gathers its global batch from the
  epoch's order inside the jitted step, so the host does no per-step work;
- **streamed** (`StreamedFeed`): larger splits (ImageNet) are read batch by batch by grain worker
  processes, which decode and resize; each process reads only its rows of every global batch.

Both give the same global batches for the same seed, and a resumed run starts at its step without
replaying the epoch. Evaluation sees every example exactly once: each process reads a contiguous
shard, padded to full batches with mask=False.

Datasets prepared as TFRecord (tfds' default before ArrayRecord) are read once through tf.data when
TensorFlow is installed; without it, the error says how to convert them
(`python -m attn_jax.convert_dataset`).
"""

import ctypes
import dataclasses
import math
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax.errors import UserError

Batch = dict[str, np.ndarray]
CONVERT_HINT = "python -m attn_jax.convert_dataset --name={name} --data_dir={data_dir} --out_dir=NEW_DIR"
_READ_CHUNK = 1024  # examples per read when a whole split is decoded
BATCH_AXIS = PartitionSpec("data")  # a batch's examples are split over the mesh's `data` axis
STACKED_BATCH_AXIS = PartitionSpec(None, "data")  # [steps, batch, ...]: the steps of one call


# ---------------------------------------------------------------------------------------------
# Splits: random access to decoded (image, label) examples
# ---------------------------------------------------------------------------------------------
class Examples:
    """A tfds random-access source as uint8 images [H, W, C] and int32 labels; picklable, so grain's
    worker processes can decode. `image_size` resizes every image to a square (mixed-size datasets)."""

    def __init__(self, records: Sequence, image_key: str, label_key: str, image_size: int | None):
        self.records, self.image_key, self.label_key = records, image_key, label_key
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Examples `indices` -> (uint8 [n, H, W, C], int32 [n])."""
        keys = [int(i) for i in indices]
        try:
            records = self.records.__getitems__(keys)  # one read for many: twice as fast
        except TypeError:  # tfds.testing.mock_data's sources read one key at a time
            records = [self.records[k] for k in keys]
        images = [fixed_size(np.asarray(r[self.image_key]), self.image_size) for r in records]
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return np.stack(images) if images else np.zeros((0, 0, 0, 0), np.uint8), labels


class Arrays:
    """Examples already decoded in host memory: uint8 images [N, H, W, C], int32 labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


def fixed_size(image: np.ndarray, size: int | None) -> np.ndarray:
    """config.dataset.image_size: a size x size uint8 copy of `image` (PIL bilinear, antialiased when
    shrinking); None keeps the native size."""
    if not size or image.shape[:2] == (size, size):
        return image
    from PIL import Image

    resized = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
        (size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized).reshape(size, size, image.shape[-1])


@dataclasses.dataclass
class Split:
    """One split of a dataset (all processes' examples), readable by index."""

    name: str  # the tfds split string, e.g. "train[:40000]"
    examples: Examples | Arrays
    image_shape: tuple[int, int, int]  # of every image, after config.dataset.image_size
    workers: int  # decoding processes for streamed reads (0: in this process)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def nbytes(self) -> int:
        return self.num_examples * math.prod(self.image_shape)

    def in_memory(self) -> "Split":
        """This split decoded once into host memory (by `workers` processes, a chunk each)."""
        if isinstance(self.examples, Arrays):
            return self
        chunks = np.array_split(np.arange(self.num_examples),
                                max(1, math.ceil(self.num_examples / _READ_CHUNK)))
        images = np.empty((self.num_examples, *self.image_shape), np.uint8)
        labels = np.empty(self.num_examples, np.int32)
        for chunk, (x, y) in zip(chunks, read_batches(self, chunks), strict=True):
            images[chunk], labels[chunk] = x, y
        return dataclasses.replace(self, examples=Arrays(images, labels))


def _builder(cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder of `cfg.name`, prepared (downloading only if `cfg.download`)."""
    import attn_jax.datasets  # noqa: F401  (registers the datasets attn_jax ships, at first use)

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
            f"False: prepare it there (tfds build {cfg.name} --file_format=array_record "
            f"--data_dir=...), point config.dataset.data_dir at a prepared copy, {hint}")
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:  # noqa: BLE001  (any download failure gets the same advice)
        reason = type(e).__name__ + (f": {str(e).splitlines()[0][:100]}" if str(e) else "")
        if "tensorflow" in str(e):
            reason = "preparing a tfds dataset needs TensorFlow (pip install tensorflow-cpu)"
        raise UserError(
            f"dataset {cfg.name!r} is not prepared in {where} and could not be prepared "
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


def read_workers(cfg: ml_collections.ConfigDict) -> int:
    """config.dataset.read_workers; None: one per CPU core (at most 16) with 4 cores or more, none
    below (starting worker processes costs more than it gains on 2 cores: CIFAR-10's 40,000 images
    decoded in 3.8 s here, 4.6 s by 2 workers)."""
    workers, cores = cfg.get("read_workers"), len(os.sched_getaffinity(0))
    if workers is None:
        return min(16, cores) if cores >= 4 else 0
    return int(workers)


def load_split(cfg: ml_collections.ConfigDict, split: str) -> Split:
    """The tfds split `split` (e.g. "train[:40000]") of config.dataset `cfg`, by random access."""
    builder = _builder(cfg)
    image_size = cfg.get("image_size")
    features = builder.info.features
    if cfg.image_key not in features or cfg.label_key not in features:
        raise UserError(f"dataset {cfg.name!r} has features {sorted(features.keys())}: set "
                        "config.dataset.image_key and label_key to two of them")
    shape = features[cfg.image_key].shape
    if image_size:
        shape = (image_size, image_size, shape[-1])
    elif None in shape:
        raise UserError(f"the images of {cfg.name!r} differ in size: set config.dataset.image_size "
                        "to resize them to one size on the host")
    shape = tuple(int(s) for s in shape)
    try:
        records = builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as TFRecord: no random access without TensorFlow
        records = _tfrecord_examples(builder, split, cfg, shape)
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"bad split {split!r} for dataset {cfg.name!r}: {e}") from None
    if not isinstance(records, Arrays):
        records = Examples(records, cfg.image_key, cfg.label_key, image_size)
    return Split(split, records, shape, read_workers(cfg))


def _tfrecord_examples(builder: tfds.core.DatasetBuilder, split: str,
                       cfg: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> Arrays:
    """A split prepared as TFRecord, decoded once into host memory through tf.data (up to a quarter
    of the host's memory; larger ones must be converted)."""
    hint = CONVERT_HINT.format(name=cfg.name, data_dir=cfg.data_dir or "~/tensorflow_datasets")
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(
            f"dataset {cfg.name!r} is prepared as TFRecord, which needs TensorFlow to read: "
            f"convert it once to ArrayRecord ({hint}; needs no TensorFlow) and point "
            "config.dataset.data_dir at NEW_DIR, or pip install tensorflow-cpu") from None
    tf.config.set_visible_devices([], "GPU")  # tf.data only: keep TensorFlow off the accelerators
    try:
        num = builder.info.splits[split].num_examples
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"bad split {split!r} for dataset {cfg.name!r}: {e}") from None
    if num * math.prod(image_shape) > host_memory_bytes() // 4:
        raise UserError(f"dataset {cfg.name!r} is prepared as TFRecord and too large to decode "
                        f"into memory: convert it to ArrayRecord ({hint})")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    images, labels = [], []
    for ex in ds.as_numpy_iterator():
        images.append(fixed_size(ex[cfg.image_key], cfg.get("image_size")))
        labels.append(ex[cfg.label_key])
    return Arrays(np.stack(images), np.asarray(labels, np.int32))


def read_batches(split: Split, batches: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each index array in `batches`, in order. Decoded examples are read
    directly; others by `split.workers` grain worker processes (a batch each), or here with 0."""
    if isinstance(split.examples, Arrays) or split.workers == 0 or len(batches) < 2:
        for indices in batches:
            yield split.examples.read(indices)
        return
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: parsed by launch.py, not
        flags.FLAGS.mark_as_parsed()  # when attn_jax is called from Python (a notebook, the tests)
    ds = grain.MapDataset.source(_BatchReads(split.examples, list(batches)))
    options = grain.MultiprocessingOptions(num_workers=min(split.workers, len(batches)))
    yield from ds.to_iter_dataset().mp_prefetch(options, worker_init_fn=_exit_with_parent)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In a grain worker: leave SIGINT and SIGTERM to the run (a Ctrl-C or a scheduler's SIGTERM
    reaches the whole process group; the run saves a checkpoint and closes its workers), and have
    Linux kill the worker when the process that started it dies, so a run killed with SIGKILL leaves
    no decoding processes behind."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


class _BatchReads:
    """Element i = examples.read(batches[i]): one grain element per batch."""

    def __init__(self, examples: Examples, batches: list[np.ndarray]):
        self.examples, self.batches = examples, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.examples.read(self.batches[i])


# ---------------------------------------------------------------------------------------------
# The order of an epoch
# ---------------------------------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, num_examples: int, repeats: int = 1,
                global_batch: int = 1) -> np.ndarray:
    """The examples of epoch `epoch` in training order: a uniform permutation, int32 [N], the same
    on every path, process and device count.

    With `repeats` > 1, repeated augmentation (DeiT's RASampler; config.dataset.repeats): each
    global batch holds ceil(B / repeats) examples of the permutation, each `repeats` times at a
    stride of ceil(B / repeats) rows (so on different devices when there are at least `repeats`),
    cut to B; int32 [N // B * B]: the epoch keeps its number of steps and sees about N / repeats
    distinct examples, every copy augmented with its own key.
    """
    order = np.random.default_rng((seed, epoch)).permutation(num_examples).astype(np.int32)
    if repeats == 1:
        return order
    distinct = -(-global_batch // repeats)
    batches = num_examples // global_batch
    chunks = order[:batches * distinct].reshape(batches, distinct)
    return np.tile(chunks, (1, repeats))[:, :global_batch].reshape(-1)


def local_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch that this process's devices hold, in the order
    `jax.make_array_from_process_local_data` expects its local data."""
    sharding = NamedSharding(mesh, BATCH_AXIS)
    shards = sharding.addressable_devices_indices_map((global_batch,)).values()
    starts = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in shards})
    return np.concatenate([np.arange(start, stop) for start, stop in starts])


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of `global_batch`; a clear error when it does not divide evenly."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise UserError(
            f"batch size {global_batch} does not divide over {devices} devices: set "
            f"config.batch_size (and config.eval_batch_size) to a multiple of {devices}")
    return global_batch // jax.process_count()


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_limit_bytes(cfg: ml_collections.ConfigDict, device: jax.Device) -> int:
    """config.dataset.resident_limit_mib in bytes; None: a quarter of the device's memory (of the
    host's on CPU or when the device does not say)."""
    mib = cfg.get("resident_limit_mib")
    if mib is not None:
        return int(mib) * 2**20
    return int((device.memory_stats() or {}).get("bytes_limit") or host_memory_bytes()) // 4


def is_resident(split: Split, cfg: ml_collections.ConfigDict, mesh: Mesh) -> bool:
    """Whether `split` is kept on every device: it fits within the resident limit."""
    return split.nbytes <= resident_limit_bytes(cfg, mesh.local_devices[0])


def fits_in_host_memory(split: Split) -> bool:
    """Whether `split` decoded takes at most a tenth of the host's memory (evaluation splits are
    then decoded once and kept, rather than decoded again at every evaluation)."""
    return split.nbytes <= host_memory_bytes() // 10


# ---------------------------------------------------------------------------------------------
# Feeding the training steps
# ---------------------------------------------------------------------------------------------
def call_sizes(start: int, end: int, steps_per_call: int, every: Sequence[int]) -> list[int]:
    """Steps per jitted call from step `start` to `end`: `steps_per_call` where no multiple of any
    of `every` (logging, checkpoints) falls inside the call, else single steps up to it. So logs and
    checkpoints land on the same steps for every steps_per_call, with two compiled step counts."""
    sizes, step = [], start
    while step < end:
        boundary = min([end] + [(step // e + 1) * e for e in every if e > 0])
        sizes.append(steps_per_call if boundary - step >= steps_per_call else 1)
        step += sizes[-1]
    return sizes


def replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """`array` (the same in every process) on every device of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class ResidentFeed:
    """The training split on every device as uint8; a call's feed is the split and the epoch's
    order, and each step gathers its batch inside the jitted step (`batch_from_resident`)."""

    resident = True

    def __init__(self, split: Split, mesh: Mesh, global_batch: int, seed: int, repeats: int = 1):
        split = split.in_memory()
        self.mesh, self.global_batch, self.seed, self.repeats = mesh, global_batch, seed, repeats
        self.num_examples = split.num_examples
        self.steps_per_epoch = split.num_examples // global_batch
        self.arrays = {"images": replicated(split.examples.images, mesh),
                       "labels": replicated(split.examples.labels, mesh)}

    def epoch(self, epoch: int, start: int, sizes: Sequence[int]) -> Iterator[dict]:
        """The feed of each call of epoch `epoch` from its step `start` on: the same arrays each
        call (the step's position in the epoch comes from the train state's step)."""
        del start
        order = epoch_order(self.seed, epoch, self.num_examples, self.repeats,
                            self.global_batch)[:self.steps_per_epoch * self.global_batch]
        feed = {**self.arrays, "order": replicated(order, self.mesh)}
        for _ in sizes:
            yield feed


def batch_from_resident(feed: dict, step: jax.Array, global_batch: int) -> dict:
    """Inside a jitted step: batch number `step` mod (steps per epoch) of the epoch's order,
    gathered from the resident split: {"images" [B, H, W, C] uint8, "labels" [B], "mask" [B]}."""
    import jax.numpy as jnp

    steps_per_epoch = feed["order"].shape[0] // global_batch
    start = (step % steps_per_epoch) * global_batch
    indices = jax.lax.dynamic_slice_in_dim(feed["order"], start, global_batch)
    return {"images": feed["images"][indices], "labels": feed["labels"][indices],
            "mask": jnp.ones((global_batch,), bool)}


class StreamedFeed:
    """The training split read batch by batch on the host (grain workers decode) and put on the
    mesh `prefetch` calls ahead; a call of n steps gets n stacked batches [n, B, ...]."""

    resident = False

    def __init__(self, split: Split, mesh: Mesh, global_batch: int, seed: int, prefetch: int,
                 repeats: int = 1):
        self.split, self.mesh, self.global_batch, self.seed = split, mesh, global_batch, seed
        self.repeats = repeats
        self.prefetch = prefetch
        self.steps_per_epoch = split.num_examples // global_batch

    def local_indices(self, epoch: int, start: int) -> list[np.ndarray]:
        """This process's rows of every global batch of `epoch` from batch `start` on."""
        order = epoch_order(self.seed, epoch, self.split.num_examples, self.repeats,
                            self.global_batch)
        rows = local_rows(self.global_batch, self.mesh)
        return [order[b * self.global_batch:(b + 1) * self.global_batch][rows]
                for b in range(start, self.steps_per_epoch)]

    def host_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        for images, labels in read_batches(self.split, self.local_indices(epoch, start)):
            yield {"images": images, "labels": labels, "mask": np.ones(len(labels), bool)}

    def epoch(self, epoch: int, start: int, sizes: Sequence[int]) -> Iterator[dict]:
        batches = self.host_batches(epoch, start)
        stacked = ({k: np.stack([b[k] for b in group]) for k in group[0]}
                   for group in _groups(batches, sizes))
        yield from prefetch_to_mesh(stacked, self.mesh, self.prefetch, STACKED_BATCH_AXIS)


def _groups(items: Iterator, sizes: Sequence[int]) -> Iterator[list]:
    for n in sizes:
        yield [next(items) for _ in range(n)]


def make_feed(split: Split, cfg: ml_collections.ConfigDict, mesh: Mesh, global_batch: int,
              seed: int) -> ResidentFeed | StreamedFeed:
    """The device-resident feed when the split fits (`is_resident`), else the streamed one; each
    in `epoch_order`, with config.dataset.repeats (repeated augmentation; 1: off)."""
    repeats = cfg.get("repeats", 1)
    if is_resident(split, cfg, mesh):
        return ResidentFeed(split, mesh, global_batch, seed, repeats)
    return StreamedFeed(split, mesh, global_batch, seed, cfg.prefetch, repeats)


# ---------------------------------------------------------------------------------------------
# Evaluation batches
# ---------------------------------------------------------------------------------------------
def local_shard(num_examples: int, index: int | None = None, count: int | None = None) -> np.ndarray:
    """The contiguous indices of `num_examples` that process `index` of `count` evaluates."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return np.array_split(np.arange(num_examples), count)[index]


def num_eval_batches(split: Split, local_batch: int) -> int:
    """Batches every process runs over `split`: enough for the largest process shard."""
    largest_shard = math.ceil(split.num_examples / jax.process_count())
    return max(1, math.ceil(largest_shard / local_batch))


def eval_batches(split: Split, local_batch: int, index: int | None = None,
                 count: int | None = None) -> Iterator[Batch]:
    """Every example of this process's shard exactly once, in order, padded to full batches with
    mask=False; as many batches in every process."""
    shard = local_shard(split.num_examples, index, count)
    chunks = [shard[i:i + local_batch] for i in range(0, len(shard), local_batch)]
    for images, labels in read_batches(split, chunks):
        yield _pad({"images": images, "labels": labels, "mask": np.ones(len(labels), bool)},
                   local_batch)
    for _ in range(num_eval_batches(split, local_batch) - len(chunks)):  # a shorter shard
        yield _empty_batch(local_batch, split.image_shape)


def _pad(batch: Batch, size: int) -> Batch:
    missing = size - len(batch["labels"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


def _empty_batch(size: int, image_shape: tuple[int, ...]) -> Batch:
    return {"images": np.zeros((size, *image_shape), np.uint8),
            "labels": np.zeros(size, np.int32), "mask": np.zeros(size, bool)}


# ---------------------------------------------------------------------------------------------
# Host -> mesh
# ---------------------------------------------------------------------------------------------
def to_global(batch: Batch, mesh: Mesh, spec: PartitionSpec = BATCH_AXIS) -> dict:
    """Assembles each process's local batch into one global array sharded as `spec`."""
    sharding = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[Batch], mesh: Mesh, size: int = 2,
                     spec: PartitionSpec = BATCH_AXIS) -> Iterator[dict]:
    """Moves batches onto the mesh from a background thread, `size` batches ahead of the consumer.

    The transfer of batch n+1 overlaps step n, so the step never waits on the host for its input.
    A consumer that stops early (a `break`, or closing the generator) also stops the thread, which
    then releases `batches` (and the readers behind it).
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
                if not put(to_global(batch, mesh, spec)):
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
