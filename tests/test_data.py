"""attn_jax/data.py, the input: one training order for every path, resident and streamed batches
alike, calls that end on log and checkpoint steps, TFRecord data, each process's shard of a split,
and clear errors for data that cannot be read."""

import jax
import numpy as np
import pytest
from conftest import in_process_digits_config, small_digits_config

from attn_jax import data, train
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
    gather = jax.jit(data.batch_from_resident, static_argnums=2)

    def resident_batches(epoch, start):
        feed = next(resident.epoch(epoch, start, [1]))
        return [jax.device_get(gather(feed, epoch * 6 + s, 16)) for s in range(start, 6)]

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
    # The streamed feed's stacked calls hold the same batches, sharded over the devices.
    calls = list(streamed.epoch(1, 4, [2]))
    assert calls[0]["images"].shape == (2, 16, 32, 32, 3)
    np.testing.assert_array_equal(jax.device_get(calls[0]["labels"]).ravel(), seen[2])


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


def test_missing_image_key_is_a_clear_error(digits_data_dir):
    config = in_process_digits_config(digits_data_dir, **{"dataset.image_key": "img"})
    with pytest.raises(UserError, match=r"has features \['image', 'label'\]: set config.dataset"):
        data.load_split(config.dataset, "test")


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
