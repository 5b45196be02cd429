"""Input: tfds splits read by random access, without TensorFlow, and fed to the device mesh.

A split is read through `tfds.data_source` (datasets prepared in tfds' ArrayRecord format), which
decodes an example with numpy and PIL. The training order is one function of (seed, epoch),
`epoch_order`, whichever way the batches reach the devices:

- **device-resident** (`ResidentFeed`): a split that fits (`config.dataset.resident_limit_mib`) is
  decoded once and kept as uint8 on every device; each step gathers its global batch from the
  epoch's order inside the jitted step, so the host does no per-step work;
- **streamed** (`StreamedFeed`): larger splits (ImageNet) are read batch by batch by grain worker
  processes, which decode and resize; each process reads only its rows of every global batch.

Images of mixed sizes are brought to one size on the host, per image and before batching, by a host
view (config.dataset): `Resize` to image_size x image_size (crop "resize", the default),
`RandomResizedCrop`, Inception's crop of the image at its true size (crop "inception", DeiT's
training crop; the training split then always streams), and for evaluation `CenterCrop`: the shorter
side resized to image_size / eval_crop_fraction and the centre image_size x image_size kept (DeiT's
and timm's 0.875).

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
import jax.numpy as jnp
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
# Host views: how one decoded image becomes a fixed-size one, before the batch is stacked
# ---------------------------------------------------------------------------------------------
def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] -> [height, width, C] by PIL's bilinear filter, which widens its support
    when shrinking (antialiased), as torchvision's resize of a PIL image and its antialias=True do."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    resized = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized).reshape(height, width, image.shape[-1])


def fixed_size(image: np.ndarray, size: int | None) -> np.ndarray:
    """config.dataset.image_size: a size x size uint8 copy of `image` (PIL bilinear, antialiased when
    shrinking; the aspect ratio is not kept); None keeps the native size."""
    if not size:
        return image
    return pil_resize(image, size, size)


def center_crop_box(height: int, width: int, size: int, fraction: float) -> tuple[int, int, int, int]:
    """The evaluation crop of timm and DeiT (`transforms.Resize(int(size / fraction))`, then
    `CenterCrop(size)`): (new_height, new_width, top, left): the shorter side resized to
    int(size / fraction) and the longer one in proportion (truncated, as torchvision's Resize),
    then the centred size x size window (torchvision's CenterCrop rounds its offsets)."""
    short = int(size / fraction)
    if width <= height:
        new_height, new_width = int(short * height / width), short
    else:
        new_height, new_width = short, int(short * width / height)
    return (new_height, new_width, int(round((new_height - size) / 2.0)),
            int(round((new_width - size) / 2.0)))


def inception_box(height: int, width: int, rng: np.random.Generator, scale: Sequence[float],
                  ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """Inception's random crop, (top, left, crop height, crop width), by torchvision's
    `RandomResizedCrop.get_params` (torchvision/transforms/transforms.py): up to 10 attempts of an
    area fraction uniform in `scale` and a width / height ratio log-uniform in `ratio`, rounded to
    whole pixels, kept when it fits, at a uniform position; else the central fallback: the whole
    image, cut to the nearer end of `ratio` when its own ratio lies outside."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class Resize:
    """Every image resized to size x size (`fixed_size`), its aspect ratio lost: the training view
    of config.dataset.crop = "resize", and the evaluation one with eval_crop_fraction 1."""

    size: int | None
    random = False

    def __call__(self, image: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        return fixed_size(image, self.size)


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """config.dataset.eval_crop_fraction < 1: the shorter side resized to size / fraction, the
    aspect ratio kept, and the central size x size window (`center_crop_box`)."""

    size: int
    fraction: float
    random = False

    def __call__(self, image: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        height, width, top, left = center_crop_box(*image.shape[:2], self.size, self.fraction)
        return pil_resize(image, height, width)[top:top + self.size, left:left + self.size]


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """config.dataset.crop = "inception": Inception's random-resized crop of the image at its true
    size (`inception_box`, config.dataset.crop_scale and crop_ratio), resized to size x size (crop,
    then `pil_resize`, as torchvision's RandomResizedCrop of a PIL image). Its randomness is numpy's
    PCG64 seeded with `key` = (config.seed, epoch, the example's position in the epoch's order):
    the same crop in every process, worker and resume; each copy of repeated augmentation its own."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    random = True

    def box(self, height: int, width: int, key: Sequence[int]) -> tuple[int, int, int, int]:
        rng = np.random.default_rng([int(k) for k in key])
        return inception_box(height, width, rng, self.scale, self.ratio)

    def __call__(self, image: np.ndarray, key: Sequence[int] | None = None) -> np.ndarray:
        top, left, h, w = self.box(*image.shape[:2], key)
        return pil_resize(image[top:top + h, left:left + w], self.size, self.size)


View = Resize | CenterCrop | RandomResizedCrop


def host_views(cfg: ml_collections.ConfigDict) -> tuple[View, View]:
    """(training view, evaluation view) of config.dataset `cfg`: "resize" and a fraction of 1 (every
    experiment's default) resize every image to image_size x image_size, as attn_jax always did;
    the crops need an image_size (`validate.check`)."""
    size, fraction = cfg.image_size, cfg.eval_crop_fraction
    if cfg.crop == "inception":
        train_view = RandomResizedCrop(size, tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
    else:
        train_view = Resize(size)
    return train_view, (CenterCrop(size, fraction) if fraction < 1 else Resize(size))


# ---------------------------------------------------------------------------------------------
# Splits: random access to decoded (image, label) examples
# ---------------------------------------------------------------------------------------------
class Examples:
    """A tfds random-access source as uint8 images [H, W, C] and int32 labels; picklable, so grain's
    worker processes can decode. Each image is decoded at its true size and brought to one size by a
    host view (`Resize`, `CenterCrop`, `RandomResizedCrop`): `view` unless `read` is given another."""

    def __init__(self, records: Sequence, image_key: str, label_key: str, view: View):
        self.records, self.image_key, self.label_key = records, image_key, label_key
        self.view = view

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: np.ndarray, view: View | None = None,
             keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Examples `indices` -> (uint8 [n, H, W, C], int32 [n]), each image through `view` (None:
        this split's own); a random view needs `keys`, int [n, 3]: each example's crop key."""
        view = view or self.view
        if view.random and keys is None:
            raise ValueError(f"{type(view).__name__} is random: read it with a key per example")
        ids = [int(i) for i in indices]
        try:
            records = self.records.__getitems__(ids)  # one read for many: twice as fast
        except (TypeError, AttributeError):  # tfds.testing.mock_data's sources, plain lists
            records = [self.records[k] for k in ids]
        images = [view(np.asarray(r[self.image_key]), None if keys is None else keys[n])
                  for n, r in enumerate(records)]
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return np.stack(images) if images else np.zeros((0, 0, 0, 0), np.uint8), labels


class Arrays:
    """Examples already decoded in host memory at one size: uint8 images [N, H, W, C], int32
    labels [N]; read as they are (a deterministic view was applied when they were decoded)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray, view: View | None = None,
             keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if view is not None and view.random:
            raise ValueError("examples decoded into memory have lost their true size: a random "
                             "crop reads them from their source")
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass
class Split:
    """One split of a dataset (all processes' examples), readable by index: evaluation reads it
    through its examples' own view, training through `train_view` (config.dataset.crop)."""

    name: str  # the tfds split string, e.g. "train[:40000]"
    examples: Examples | Arrays
    image_shape: tuple[int, int, int]  # of every image, after config.dataset.image_size
    workers: int  # decoding processes for streamed reads (0: in this process)
    train_view: View = Resize(None)  # how the training feed reads it

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def nbytes(self) -> int:
        return self.num_examples * math.prod(self.image_shape)

    def in_memory(self, view: View | None = None) -> "Split":
        """This split decoded once into host memory (by `workers` processes, a chunk each), each
        image through `view` (None: the examples' own; a random view cannot be kept)."""
        if isinstance(self.examples, Arrays):
            return self
        if view is not None and view.random:
            raise ValueError(f"{type(view).__name__} is random: it cannot be decoded once")
        chunks = np.array_split(np.arange(self.num_examples),
                                max(1, math.ceil(self.num_examples / _READ_CHUNK)))
        images = np.empty((self.num_examples, *self.image_shape), np.uint8)
        labels = np.empty(self.num_examples, np.int32)
        for chunk, (x, y) in zip(chunks, read_batches(self, chunks, view), strict=True):
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


def check_features(cfg: ml_collections.ConfigDict, features) -> None:
    """config.dataset.image_key must name an image feature of the dataset and label_key a class
    label (tfds' `Image` and `ClassLabel`): a `UserError` naming the key, the dataset's features
    and the key to set."""
    kinds = {"image_key": (tfds.features.Image, "an image"),
             "label_key": (tfds.features.ClassLabel, "a class label")}
    for field, (kind, what) in kinds.items():
        fits = sorted(k for k, f in features.items() if isinstance(f, kind))
        if cfg[field] in fits:
            continue
        listing = ", ".join(f"{k!r} ({_describe_feature(f)})" for k, f in sorted(features.items()))
        fix = (f"set it to {fits[0]!r}" if fits else
               f"attn_jax needs a dataset with {what} feature (an image classification dataset)")
        raise UserError(f"config.dataset.{field} is {cfg[field]!r}, which is not {what} feature of "
                        f"dataset {cfg.name!r} (its features: {listing}): {fix}")


def _describe_feature(feature) -> str:
    """'image', 'class label, 10 classes', or the feature's tfds type."""
    if isinstance(feature, tfds.features.Image):
        return "image"
    if isinstance(feature, tfds.features.ClassLabel):
        return f"class label, {feature.num_classes} classes"
    return type(feature).__name__


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
    workers, cores = cfg.read_workers, len(os.sched_getaffinity(0))
    if workers is None:
        return min(16, cores) if cores >= 4 else 0
    return int(workers)


def load_split(cfg: ml_collections.ConfigDict, split: str) -> Split:
    """The tfds split `split` (e.g. "train[:40000]") of config.dataset `cfg`, by random access,
    with the views of config.dataset.crop (training) and eval_crop_fraction (evaluation)."""
    builder = _builder(cfg)
    image_size = cfg.image_size
    features = builder.info.features
    check_features(cfg, features)
    shape = features[cfg.image_key].shape
    if image_size:
        shape = (image_size, image_size, shape[-1])
    elif None in shape:
        raise UserError(f"the images of {cfg.name!r} differ in size: set config.dataset.image_size "
                        "to resize them to one size on the host")
    shape = tuple(int(s) for s in shape)
    train_view, eval_view = host_views(cfg)
    try:
        records = builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as TFRecord: no random access without TensorFlow
        if train_view != Resize(image_size) or eval_view != Resize(image_size):
            hint = CONVERT_HINT.format(name=cfg.name, data_dir=cfg.data_dir or "~/tensorflow_datasets")
            raise UserError(
                f"dataset {cfg.name!r} is prepared as TFRecord, decoded once at one size, but "
                "config.dataset.crop 'inception' and eval_crop_fraction < 1 crop each image at its "
                f"true size: convert it to ArrayRecord ({hint}), or use crop 'resize' and "
                "eval_crop_fraction 1.0") from None
        records = _tfrecord_examples(builder, split, cfg, shape)
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"bad split {split!r} for dataset {cfg.name!r}: {e}") from None
    if not isinstance(records, Arrays):
        records = Examples(records, cfg.image_key, cfg.label_key, eval_view)
    return Split(split, records, shape, read_workers(cfg), train_view)


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
        images.append(fixed_size(ex[cfg.image_key], cfg.image_size))
        labels.append(ex[cfg.label_key])
    return Arrays(np.stack(images), np.asarray(labels, np.int32))


def read_batches(split: Split, batches: Sequence[np.ndarray], view: View | None = None,
                 keys: Sequence[np.ndarray] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each index array in `batches`, in order, through `view` (None: the
    examples' own) with `keys` (a random view's per-example keys, an array [n, 3] per batch).
    Decoded examples are read directly; others by `split.workers` grain worker processes (a batch
    each), or here with 0. A batch's images depend on its indices, view and keys only."""
    keys = [None] * len(batches) if keys is None else list(keys)
    if isinstance(split.examples, Arrays) or split.workers == 0 or len(batches) < 2:
        for indices, batch_keys in zip(batches, keys, strict=True):
            yield split.examples.read(indices, view, batch_keys)
        return
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: parsed by launch.py, not
        flags.FLAGS.mark_as_parsed()  # when attn_jax is called from Python (a notebook, the tests)
    ds = grain.MapDataset.source(_BatchReads(split.examples, list(batches), view, keys))
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
    """Element i = examples.read(batches[i], view, keys[i]): one grain element per batch."""

    def __init__(self, examples: Examples, batches: list[np.ndarray], view: View | None,
                 keys: list[np.ndarray | None]):
        self.examples, self.batches, self.view, self.keys = examples, batches, view, keys

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.examples.read(self.batches[i], self.view, self.keys[i])


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
    mib = cfg.resident_limit_mib
    if mib is not None:
        return int(mib) * 2**20
    return int((device.memory_stats() or {}).get("bytes_limit") or host_memory_bytes()) // 4


def is_resident(split: Split, cfg: ml_collections.ConfigDict, mesh: Mesh) -> bool:
    """Whether `split` is kept on every device: it fits within the resident limit, and its training
    view is not random (config.dataset.crop "inception" crops each image afresh every epoch, from
    its true size: that split always streams)."""
    if split.train_view.random:
        return False
    return split.nbytes <= resident_limit_bytes(cfg, mesh.local_devices[0])


def fits_in_host_memory(split: Split) -> bool:
    """Whether `split` decoded takes at most a tenth of the host's memory (evaluation splits are
    then decoded once and kept, rather than decoded again at every evaluation)."""
    return split.nbytes <= host_memory_bytes() // 10


def load_splits(config: ml_collections.ConfigDict) -> dict[str, Split]:
    """A run's {"train", "val", "test"} splits (config.dataset's train_split, val_split,
    test_split); the evaluation splits decoded into host memory once where they fit
    (`fits_in_host_memory`), one copy when val and test are the same split (the training split is
    put on the devices by the run's feed, `make_feed`)."""
    by_name: dict[str, Split] = {}
    splits = {}
    for name in ("train", "val", "test"):
        split_name = getattr(config.dataset, f"{name}_split")
        if name == "train" or split_name not in by_name:
            split = load_split(config.dataset, split_name)
            if name != "train" and fits_in_host_memory(split):
                split = split.in_memory()
            by_name.setdefault(split_name, split)
        splits[name] = split if name == "train" else by_name[split_name]
    return splits


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


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """The train steps of an epoch over `num_examples`: whole global batches only (the tail is
    dropped; 0 when the split holds less than one batch)."""
    return num_examples // global_batch


def replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """`array` (the same in every process) on every device of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def batch_spec(size: int, image_shape: Sequence[int], mesh: Mesh, steps: int | None = None) -> dict:
    """The abstract global batch of `size` uint8 images (ShapeDtypeStructs sharded on `data`), to
    compile a step for; with `steps`, that many stacked [steps, size, ...]: a streamed call's."""
    lead, spec = ((), BATCH_AXIS) if steps is None else ((steps,), STACKED_BATCH_AXIS)
    sharding = NamedSharding(mesh, spec)
    shape = (*lead, size)
    return {"images": jax.ShapeDtypeStruct((*shape, *image_shape), jnp.uint8, sharding=sharding),
            "labels": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sharding)}


# A feed gives each jitted call of n train steps one input (`epoch` yields them; `call_spec(n)` is
# its abstract form, to compile for), placed on the mesh as `sharding(mesh)` says; inside the call,
# `batch(inputs, step, i, mesh)` is the global batch of the call's i-th step, whose train state is at
# step `step`. `train.jit_train_call` takes these two from the feed and knows nothing else of it.

class ResidentFeed:
    """The training split on every device as uint8; a call's input is the split and the epoch's
    order, and each step gathers its batch inside the jitted call (`batch`). The split is decoded
    once through its training view, which must not be random (`is_resident`)."""

    resident = True

    def __init__(self, split: Split, mesh: Mesh, global_batch: int, seed: int, repeats: int = 1):
        if split.train_view.random:
            raise UserError("config.dataset.crop 'inception' crops each image afresh every epoch: "
                            "the training split streams (data.make_feed), it cannot be resident")
        split = split.in_memory(split.train_view)
        self.mesh, self.global_batch, self.seed, self.repeats = mesh, global_batch, seed, repeats
        self.num_examples = split.num_examples
        self.steps_per_epoch = steps_per_epoch(split.num_examples, global_batch)
        self.arrays = {"images": replicated(split.examples.images, mesh),
                       "labels": replicated(split.examples.labels, mesh)}

    @staticmethod
    def sharding(mesh: Mesh) -> NamedSharding:
        """A call's input is replicated: every device holds the whole split."""
        return NamedSharding(mesh, PartitionSpec())

    @staticmethod
    def batch(inputs: dict, step: jax.Array, i, mesh: Mesh) -> dict:
        """Inside a jitted call: batch `step` mod (steps per epoch) of the epoch's order [steps, B],
        gathered from the resident split: {"images" [B, H, W, C] uint8, "labels" [B], "mask" [B]},
        sharded on `data`. The state's `step` says where the epoch is; `i` is not needed."""
        del i
        steps, global_batch = inputs["order"].shape
        start = (step % steps) * global_batch
        indices = jax.lax.dynamic_slice_in_dim(inputs["order"].reshape(-1), start, global_batch)
        batch = {"images": inputs["images"][indices], "labels": inputs["labels"][indices],
                 "mask": jnp.ones((global_batch,), bool)}
        return jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, BATCH_AXIS))

    def call_spec(self, num_steps: int) -> dict:
        """The abstract input of a call, whatever its number of steps."""
        del num_steps
        order = jax.ShapeDtypeStruct((self.steps_per_epoch, self.global_batch), jnp.int32,
                                     sharding=self.sharding(self.mesh))
        return {**{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                   for k, v in self.arrays.items()}, "order": order}

    def epoch(self, epoch: int, start: int, sizes: Sequence[int]) -> Iterator[dict]:
        """The input of each call of epoch `epoch` from its step `start` on: the same arrays each
        call (the step's position in the epoch comes from the train state's step)."""
        del start
        order = epoch_order(self.seed, epoch, self.num_examples, self.repeats, self.global_batch)
        shape = (self.steps_per_epoch, self.global_batch)
        inputs = {**self.arrays, "order": replicated(order[:math.prod(shape)].reshape(shape), self.mesh)}
        for _ in sizes:
            yield inputs


class StreamedFeed:
    """The training split read batch by batch on the host (grain workers decode and apply its
    training view) and put on the mesh `prefetch` calls ahead; a call of n steps gets n stacked
    batches [n, B, ...]. A random view (Inception crops) gets the key (seed, epoch, position in the
    epoch's order) for each example: every process, worker count and resume crops alike."""

    resident = False

    def __init__(self, split: Split, mesh: Mesh, global_batch: int, seed: int, prefetch: int,
                 repeats: int = 1):
        self.split, self.mesh, self.global_batch, self.seed = split, mesh, global_batch, seed
        self.repeats = repeats
        self.prefetch = prefetch
        self.steps_per_epoch = steps_per_epoch(split.num_examples, global_batch)

    @staticmethod
    def sharding(mesh: Mesh) -> NamedSharding:
        """A call's stacked batches are sharded on `data` along the batch axis."""
        return NamedSharding(mesh, STACKED_BATCH_AXIS)

    @staticmethod
    def batch(inputs: dict, step: jax.Array, i, mesh: Mesh) -> dict:
        """Inside a jitted call: the call's i-th batch of its stacked ones, [n, B, ...] -> [B, ...]."""
        del step, mesh
        return jax.tree.map(lambda x: x[i], inputs)

    def call_spec(self, num_steps: int) -> dict:
        """The abstract input of a call of `num_steps` steps."""
        return batch_spec(self.global_batch, self.split.image_shape, self.mesh, steps=num_steps)

    def local_indices(self, epoch: int, start: int) -> list[np.ndarray]:
        """This process's rows of every global batch of `epoch` from batch `start` on."""
        order = epoch_order(self.seed, epoch, self.split.num_examples, self.repeats,
                            self.global_batch)
        rows = local_rows(self.global_batch, self.mesh)
        return [order[b * self.global_batch:(b + 1) * self.global_batch][rows]
                for b in range(start, self.steps_per_epoch)]

    def local_keys(self, epoch: int, start: int) -> list[np.ndarray]:
        """The crop keys of `local_indices`: int64 [rows, 3] of (seed, epoch, position in the
        epoch's order) per example, so repeated copies of an example crop differently."""
        rows = local_rows(self.global_batch, self.mesh)
        return [np.stack(np.broadcast_arrays(self.seed, epoch, b * self.global_batch + rows), -1)
                .astype(np.int64) for b in range(start, self.steps_per_epoch)]

    def host_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        view = self.split.train_view
        keys = self.local_keys(epoch, start) if view.random else None
        for images, labels in read_batches(self.split, self.local_indices(epoch, start), view, keys):
            yield {"images": images, "labels": labels, "mask": np.ones(len(labels), bool)}

    def epoch(self, epoch: int, start: int, sizes: Sequence[int]) -> Iterator[dict]:
        batches = self.host_batches(epoch, start)
        stacked = ({k: np.stack([b[k] for b in group]) for k in group[0]}
                   for group in _groups(batches, sizes))
        yield from prefetch_to_mesh(stacked, self.mesh, self.prefetch, STACKED_BATCH_AXIS)


Feed = ResidentFeed | StreamedFeed


def _groups(items: Iterator, sizes: Sequence[int]) -> Iterator[list]:
    for n in sizes:
        yield [next(items) for _ in range(n)]


def make_feed(split: Split, cfg: ml_collections.ConfigDict, mesh: Mesh, global_batch: int,
              seed: int) -> Feed:
    """The device-resident feed when the split fits (`is_resident`; never with Inception crops),
    else the streamed one; each in `epoch_order`, with config.dataset.repeats (repeated
    augmentation; 1: off)."""
    if is_resident(split, cfg, mesh):
        return ResidentFeed(split, mesh, global_batch, seed, cfg.repeats)
    return StreamedFeed(split, mesh, global_batch, seed, cfg.prefetch, cfg.repeats)


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
