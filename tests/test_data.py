"""attn_jax/data.py, the input: one training order for every path, resident and streamed batches
alike, calls that end on log and checkpoint steps, TFRecord data, each process's shard of a split,
and clear errors for data that cannot be read."""

import functools

import jax
import numpy as np
import pytest
from conftest import in_process_digits_config, small_digits_config
from PIL import Image

from attn_jax import data, train
from attn_jax.config import base
from attn_jax.errors import UserError


def test_epoch_order_is_a_fixed_permutation_per_epoch():
    first, again, second = (data.epoch_order(3, e, 50) for e in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == list(range(50)) and first.dtype == np.int32
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, data.epoch_order(4, 0, 50))  # another seed


def test_repeated_augmentation_repeats_each_example_within_its_batch_across_devices():
    order = data.epoch_order(3, 0, 100, repeats=3, global_batch=12)
    np.testing.assert_array_equal(order, data.epoch_order(3, 0, 100, 3, 12))  # deterministic
    assert len(order) == 96 and order.dtype == np.int32  # 8 steps of 12, as without repeats
    for batch in order.reshape(8, 12):
        values, counts = np.unique(batch, return_counts=True)
        assert len(values) == 4 and set(counts) == {3}
        for value in values:  # on 4 devices of 3 rows each, the 3 copies on 3 devices
            assert len(set(np.flatnonzero(batch == value) // 3)) == 3
    assert len(set(order)) == 32  # each example in one batch only
    assert set(order) <= set(data.epoch_order(3, 0, 100)[:32])
    np.testing.assert_array_equal(data.epoch_order(3, 0, 100, 1, 12), data.epoch_order(3, 0, 100))
    uneven = data.epoch_order(3, 0, 100, repeats=3, global_batch=16)  # 6 examples, cut to 16 rows
    assert len(uneven) == 96 and sorted(np.unique(uneven[:16], return_counts=True)[1]) == [
        2, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("start, end, k, every, expected", [
    (0, 12, 4, (), [4, 4, 4]),
    (0, 10, 4, (), [4, 4, 1, 1]),  # the epoch's end is not a multiple of 4
    (0, 12, 4, (6,), [4, 1, 1, 4, 1, 1]),  # a log line at step 6
    (5, 12, 4, (6,), [1, 4, 1, 1]),  # resumed at step 5
    (0, 3, 1, (2, 5), [1, 1, 1]),
])
def test_call_sizes_keep_logs_and_checkpoints_on_their_steps(start, end, k, every, expected):
    sizes = data.call_sizes(start, end, k, every)
    assert sizes == expected and sum(sizes) == end - start
    steps = np.cumsum([start, *sizes])
    for e in every:  # every multiple of e in the range ends a call
        assert all(m in steps for m in range((start // e + 1) * e, end + 1, e))


def test_resident_and_streamed_feeds_give_the_same_batches(digits_data_dir):
    """Over an epoch boundary and a resume in the middle of an epoch, on 8 devices."""
    config = in_process_digits_config(digits_data_dir)
    mesh = train.create_mesh()
    split = data.load_split(config.dataset, "train[:100]")
    resident = data.ResidentFeed(split, mesh, global_batch=16, seed=7)
    streamed = data.StreamedFeed(split, mesh, global_batch=16, seed=7, prefetch=2)
    assert resident.steps_per_epoch == streamed.steps_per_epoch == 6  # 100 // 16, the tail dropped
    gather = jax.jit(functools.partial(data.ResidentFeed.batch, i=0, mesh=mesh))  # as a call does

    def resident_batches(epoch, start):
        inputs = next(resident.epoch(epoch, start, [1]))
        assert inputs["order"].shape == (6, 16)  # the epoch's batches
        return [jax.device_get(gather(inputs, epoch * 6 + s)) for s in range(start, 6)]

    seen = []
    for epoch, start in ((0, 0), (1, 0), (1, 4)):  # (1, 4): a run resumed at step 10
        expected = list(streamed.host_batches(epoch, start))
        got = resident_batches(epoch, start)
        assert len(got) == len(expected) == 6 - start
        for a, b in zip(got, expected, strict=True):
            for key in ("images", "labels", "mask"):
                np.testing.assert_array_equal(a[key], b[key])
        seen.append(np.concatenate([b["labels"] for b in expected]))
    assert not np.array_equal(seen[0], seen[1])  # each epoch its own order
    np.testing.assert_array_equal(seen[2], seen[1][4 * 16:])  # the resume continues the epoch
    # The streamed feed's stacked calls hold the same batches, sharded over the devices, and step i
    # of a call takes the i-th.
    calls = list(streamed.epoch(1, 4, [2]))
    assert calls[0]["images"].shape == (2, 16, 32, 32, 3)
    np.testing.assert_array_equal(jax.device_get(calls[0]["labels"]).ravel(), seen[2])
    second = data.StreamedFeed.batch(calls[0], step=11, i=1, mesh=mesh)
    np.testing.assert_array_equal(jax.device_get(second["labels"]), seen[2][16:])


def test_tfrecord_data_reads_like_array_record(digits_data_dir, digits_tfrecord_dir):
    """With TensorFlow installed, a split prepared as TFRecord is decoded once through tf.data."""
    tfrecord = data.load_split(in_process_digits_config(digits_tfrecord_dir).dataset, "test")
    array_record = data.load_split(in_process_digits_config(digits_data_dir).dataset, "test")
    assert isinstance(tfrecord.examples, data.Arrays)
    indices = np.arange(array_record.num_examples)
    for a, b in zip(tfrecord.examples.read(indices), array_record.examples.read(indices), strict=True):
        np.testing.assert_array_equal(a, b)


def test_host_resize_batches_images_of_mixed_sizes():
    """config.dataset.image_size: ImageNet-like datasets whose images differ in size still batch."""
    images = [np.full((h, w, 3), 200, np.uint8) for h, w in ((40, 60), (33, 20), (64, 64))]
    batch = np.stack([data.fixed_size(image, 32) for image in images])
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    assert (batch == 200).all()  # a constant image stays constant
    assert data.fixed_size(images[2], 64) is images[2]


# ImageNet-style crops (config.dataset.crop, crop_scale, crop_ratio, eval_crop_fraction)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's defaults, DeiT's


def _mixed_size_split(n: int = 64, workers: int = 0, size: int = 16) -> data.Split:
    """`n` examples of six sizes (square, wide, tall, extreme), random pixels, label = index; read
    with Inception crops for training and the 0.875 centre crop for evaluation."""
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (33, 20), (64, 64), (10, 200), (17, 16), (90, 30)]
    records = [{"image": rng.integers(0, 256, (*shapes[i % 6], 3), np.uint8), "label": i}
               for i in range(n)]
    examples = data.Examples(records, "image", "label", data.CenterCrop(size, 0.875))
    return data.Split("mixed", examples, (size, size, 3), workers,
                      data.RandomResizedCrop(size, SCALE, RATIO))


@pytest.mark.parametrize("height, width", [(40, 60), (33, 20), (64, 64), (17, 16), (90, 30),
                                           (1, 1), (10, 200), (200, 10)])
def test_inception_box_stays_inside_the_image_and_its_ranges(height, width):
    """torchvision's RandomResizedCrop.get_params: a box inside the image whose area fraction and
    width / height ratio lie in their ranges up to whole-pixel rounding, or the central fallback."""
    crop = data.RandomResizedCrop(16, SCALE, RATIO)
    area, boxes = height * width, set()
    in_ratio = width / height
    fallback_w = width if in_ratio <= RATIO[1] else round(height * RATIO[1])
    fallback_h = height if in_ratio >= RATIO[0] else round(width / RATIO[0])
    fallback = ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
    for position in range(300):
        top, left, h, w = box = crop.box(height, width, (5, 2, position))
        assert box == crop.box(height, width, (5, 2, position))  # a function of its key
        assert top >= 0 and left >= 0 and top + h <= height and left + w <= width and h and w
        boxes.add(box)
        if box == fallback:
            continue
        # w = round(sqrt(A r)), h = round(sqrt(A / r)) for an area A and a ratio r in range
        assert (w + .5) * (h + .5) >= SCALE[0] * area and (w - .5) * (h - .5) <= SCALE[1] * area
        assert (w + .5) / (h - .5) >= RATIO[0] and (w - .5) / (h + .5) <= RATIO[1]
    if min(height, width) >= 16:
        assert len(boxes) > 100  # random: positions and sizes vary
    if (height, width) == (10, 200):  # no crop of 8% of the area fits 10 rows at ratio <= 4/3
        assert boxes == {(0, 93, 10, 13)}  # the fallback: full height, width round(10 * 4/3)
    if (height, width) == (200, 10):
        assert boxes == {(93, 0, 13, 10)}


def test_inception_crops_are_a_function_of_seed_epoch_and_position(monkeypatch):
    """The same crops with 0 or 2 grain workers, in 1 or 2 processes (each its rows of every global
    batch), and after a resume mid-epoch; another epoch or seed crops otherwise."""
    mesh = train.create_mesh()
    split = _mixed_size_split()
    feed = data.StreamedFeed(split, mesh, global_batch=16, seed=3, prefetch=2)
    limit = base().dataset
    limit.resident_limit_mib = 1024
    assert not data.is_resident(split, limit, mesh)  # random crops always stream
    whole = list(feed.host_batches(1, 0))
    assert len(whole) == 4 and whole[0]["images"].shape == (16, 16, 16, 3)
    order = data.epoch_order(3, 1, 64)
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in whole]), order)
    # 2 grain workers decode the same batches
    workers = data.StreamedFeed(_mixed_size_split(workers=2), mesh, 16, 3, 2)
    for a, b in zip(workers.host_batches(1, 0), whole, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    # a run resumed at the epoch's third step
    for a, b in zip(feed.host_batches(1, 2), whole[2:], strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    # 2 processes: each reads its half of every global batch
    halves = []
    for rows in (np.arange(8), np.arange(8, 16)):
        monkeypatch.setattr(data, "local_rows", lambda global_batch, mesh, rows=rows: rows)
        halves.append(list(feed.host_batches(1, 0)))
    for first, second, b in zip(*halves, whole, strict=True):
        np.testing.assert_array_equal(np.concatenate([first["images"], second["images"]]),
                                      b["images"])
    monkeypatch.undo()
    # each crop is the image's crop by its key (seed, epoch, position), resized
    image = split.examples.records[order[5]]["image"]
    np.testing.assert_array_equal(whole[0]["images"][5], split.train_view(image, (3, 1, 5)))
    for key in ((3, 2, 5), (4, 1, 5), (3, 1, 6)):  # another epoch, seed or position
        assert not np.array_equal(split.train_view(image, key), whole[0]["images"][5])
    # repeated augmentation: each copy of an example its own crop (but a 10 x 200 image's, which
    # is always the central fallback)
    repeated = next(data.StreamedFeed(split, mesh, 16, 3, 2, repeats=2).host_batches(1, 0))
    np.testing.assert_array_equal(repeated["labels"][:8], repeated["labels"][8:])
    row = next(r for r in range(8) if repeated["labels"][r] % 6 != 3)
    assert not np.array_equal(repeated["images"][row], repeated["images"][row + 8])


def test_resident_feed_refuses_inception_crops():
    with pytest.raises(UserError, match="crop 'inception' crops each image afresh every epoch"):
        data.ResidentFeed(_mixed_size_split(), train.create_mesh(), 16, 3)


def test_eval_center_crop_keeps_the_aspect_ratio():
    """DeiT's eval transform at 28 px, fraction 0.875: shorter side to int(28 / 0.875) = 32, the
    centre 28 x 28. A 32 x 64 image is not resized: its crop is rows 2..29, columns 18..45."""
    image = np.arange(32 * 64 * 3, dtype=np.uint32).reshape(32, 64, 3).astype(np.uint8)
    view = data.CenterCrop(28, 0.875)
    np.testing.assert_array_equal(view(image), image[2:30, 18:46])
    np.testing.assert_array_equal(view(image.transpose(1, 0, 2)), image[2:30, 18:46].transpose(1, 0, 2))
    assert data.center_crop_box(375, 500, 224, 0.875) == (256, 341, 16, 58)  # an ImageNet photo
    # 64 x 128 of 16 x 16 square blocks, halved to 32 x 64: the blocks stay square (8 x 8), where
    # squashing to 28 x 28 would make them 7 x 3.5; pixels 2 or more from a block's edge are the
    # block's value (PIL's antialiased bilinear at factor 2 reaches 1.5 output pixels)
    blocks = (np.arange(4 * 8).reshape(4, 8) * 7).astype(np.uint8)
    big = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[..., None].repeat(3, -1)
    for transpose in (False, True):
        source, values = (big.transpose(1, 0, 2), blocks.T) if transpose else (big, blocks)
        crop = view(source)
        assert crop.shape == (28, 28, 3)
        top, left = (18, 2) if transpose else (2, 18)
        for r in range(28):
            for c in range(28):
                y, x = r + top, c + left
                if 2 <= y % 8 <= 5 and 2 <= x % 8 <= 5:
                    assert (crop[r, c] == values[y // 8, x // 8]).all(), (transpose, r, c)


def test_default_crops_leave_the_host_batches_unchanged(digits_data_dir):
    """crop "resize" and eval_crop_fraction 1 (every experiment's): each image squashed to
    image_size by PIL bilinear, as before these fields, for training (resident and streamed) and
    evaluation alike; "inception" and 0.875 read the same split otherwise."""
    config = in_process_digits_config(digits_data_dir, **{"dataset.image_size": 24})
    assert (config.dataset.crop, config.dataset.eval_crop_fraction) == ("resize", 1.0)
    split = data.load_split(config.dataset, "train[:48]")
    assert split.train_view == split.examples.view == data.Resize(24)
    raw = [np.asarray(split.examples.records[i]["image"]) for i in range(48)]
    expected = np.stack([np.asarray(Image.fromarray(r).resize((24, 24), Image.Resampling.BILINEAR))
                         for r in raw])  # the host resize as it was written before
    np.testing.assert_array_equal(split.examples.read(np.arange(48))[0], expected)
    mesh = train.create_mesh()
    assert isinstance(data.make_feed(split, config.dataset, mesh, 16, 7), data.ResidentFeed)
    streamed = data.StreamedFeed(split, mesh, 16, 7, 2)
    for indices, batch in zip(streamed.local_indices(0, 0), streamed.host_batches(0, 0), strict=True):
        np.testing.assert_array_equal(batch["images"], expected[indices])
    cropped = in_process_digits_config(digits_data_dir, **{
        "dataset.image_size": 24, "dataset.crop": "inception", "dataset.eval_crop_fraction": 0.875})
    split = data.load_split(cropped.dataset, "train[:48]")
    assert split.train_view == data.RandomResizedCrop(24, SCALE, RATIO)
    assert split.examples.view == data.CenterCrop(24, 0.875)
    feed = data.make_feed(split, cropped.dataset, mesh, 16, 7)
    assert isinstance(feed, data.StreamedFeed)
    batch = next(feed.host_batches(0, 0))
    assert batch["images"].shape == (16, 24, 24, 3) and not np.array_equal(
        batch["images"], expected[feed.local_indices(0, 0)[0]])


def test_crops_of_data_prepared_as_tfrecord_are_a_clear_error(digits_tfrecord_dir):
    config = in_process_digits_config(digits_tfrecord_dir, **{"dataset.image_size": 24,
                                                               "dataset.crop": "inception"})
    with pytest.raises(UserError, match="prepared as TFRecord.*convert it to ArrayRecord"):
        data.load_split(config.dataset, "test")


@pytest.mark.parametrize("key, value, fix", [
    ("image_key", "img", "an image feature.*set it to 'image'"),
    ("label_key", "image", "a class label feature.*set it to 'label'"),  # the images as labels
    ("image_key", "label", "an image feature.*set it to 'image'")])
def test_a_key_that_names_no_such_feature_is_a_clear_error(digits_data_dir, key, value, fix):
    config = in_process_digits_config(digits_data_dir, **{f"dataset.{key}": value})
    with pytest.raises(UserError, match=rf"config.dataset.{key} is '{value}', which is not {fix}"
                       ) as raised:
        data.load_split(config.dataset, "test")
    assert "(its features: 'image' (image), 'label' (class label, 10 classes))" in str(raised.value)


def test_batch_that_does_not_divide_over_devices_is_a_clear_error(tiny_config):
    with pytest.raises(UserError, match="batch size 12 does not divide over 8 devices"):
        data.local_batch_size(12, train.create_mesh())


def test_missing_dataset_is_a_clear_error(tmp_path, tiny_config):
    config = tiny_config(**{"dataset.data_dir": str(tmp_path), "dataset.download": False})
    with pytest.raises(UserError, match=r"'cifar10' is not prepared in .*:smoke"):
        data.load_split(config.dataset, "train")


def test_uneven_eval_shards_pad_to_the_same_batch_count(digits_data_dir):
    config = small_digits_config(digits_data_dir)
    split = data.load_split(config.dataset, "train[1150:1187]")
    assert [len(data.local_shard(37, i, 2)) for i in (0, 1)] == [19, 18]
    # Every process must run as many eval steps as the others, padding with masked examples.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "process_count", lambda: 2)
        batches = [list(data.eval_batches(split, 8, i, 2)) for i in (0, 1)]
    assert [len(b) for b in batches] == [3, 3]
    assert sum(int(b["mask"].sum()) for shard in batches for b in shard) == 37
    labels = np.concatenate([b["labels"][b["mask"]] for shard in batches for b in shard])
    np.testing.assert_array_equal(labels, split.examples.read(np.arange(37))[1])  # each once
