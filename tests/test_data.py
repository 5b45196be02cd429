"""The input: one training order for every path, resident and streamed batches alike, K steps per
call equal to K calls, TFRecord data and its conversion, and training without TensorFlow."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT, digits_config
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from attn_jax import convert_dataset, data, train
from attn_jax.errors import UserError


def _digits_config(data_dir, **overrides):
    return digits_config(data_dir, {"dataset.read_workers": 0, **overrides})


def test_epoch_order_is_a_fixed_permutation_per_epoch():
    first, again, second = (data.epoch_order(3, e, 50) for e in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert sorted(first) == list(range(50)) and first.dtype == np.int32
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, data.epoch_order(4, 0, 50))  # another seed


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
    config = _digits_config(digits_data_dir)
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


@pytest.mark.parametrize("resident_limit_mib", [None, 0], ids=["resident", "streamed"])
def test_k_steps_in_one_call_equal_k_calls(tmp_path, tiny_config, resident_limit_mib):
    config = tiny_config(**{"dataset.resident_limit_mib": resident_limit_mib})
    with tfds.testing.mock_data(num_examples=64):  # 4 steps of 16 per epoch
        run = train.build_run(config, train.create_mesh(), tmp_path)
        run.start_feed()
    assert run.feed.resident == (resident_limit_mib is None)
    initial = jax.device_get(run.state)

    def train_epoch(sizes):
        run.state = jax.device_put(initial, NamedSharding(run.mesh, PartitionSpec()))
        sums = train.zero_sums(run.mesh)
        for n, feed in zip(sizes, run.feed.epoch(0, 0, sizes), strict=True):
            run.state, sums = run.train_call(n)(run.state, sums, feed, run.train_key, run.stats)
        return jax.device_get((run.state.params, sums))

    (one_params, one_sums), (four_params, four_sums) = train_epoch([1] * 4), train_epoch([4])
    assert int(run.state.step) == 4
    # Not bitwise: XLA compiles the 4 steps as one program and fuses across their boundaries
    # (looped or unrolled), so a few float roundings differ; Adam's normalised update turns last-bit
    # gradient differences of near-zero gradients into parameter differences of up to ~3e-5
    # (measured 6e-6 to 2.9e-5, looped or unrolled, 1 or 8 devices), against updates of ~4e-3.
    moved, differ = (max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(x), jax.tree.leaves(y), strict=True))
        for x, y in ((initial.params, one_params), (one_params, four_params)))
    assert differ < 1e-4 and moved > 30 * differ
    np.testing.assert_allclose(four_sums["loss"], one_sums["loss"], rtol=1e-6)
    assert four_sums["top1"] == one_sums["top1"] and float(one_sums["count"]) == 64


def test_unroll_steps_auto_unrolls_on_cpu_only():
    assert train.unroll_steps("auto") is (jax.default_backend() == "cpu")
    assert train.unroll_steps("loop") is False and train.unroll_steps("unroll") is True
    with pytest.raises(UserError, match="config.unroll_steps is 'yes': use 'auto', 'unroll' or 'loop'"):
        train.unroll_steps("yes")


def test_tfrecord_data_reads_like_array_record(digits_data_dir, digits_tfrecord_dir):
    """With TensorFlow installed, a split prepared as TFRecord is decoded once through tf.data."""
    tfrecord = data.load_split(_digits_config(digits_tfrecord_dir).dataset, "test")
    array_record = data.load_split(_digits_config(digits_data_dir).dataset, "test")
    assert isinstance(tfrecord.examples, data.Arrays)
    indices = np.arange(array_record.num_examples)
    for a, b in zip(tfrecord.examples.read(indices), array_record.examples.read(indices), strict=True):
        np.testing.assert_array_equal(a, b)


def test_convert_dataset_copies_every_record(tmp_path, digits_data_dir, digits_tfrecord_dir):
    assert convert_dataset.main(["--name=sklearn_digits", f"--data_dir={digits_tfrecord_dir}",
                                 f"--out_dir={tmp_path}"]) == 0
    info = json.loads(next(tmp_path.glob("sklearn_digits/*/dataset_info.json")).read_text())
    assert info["fileFormat"] == "array_record"
    for split in ("train", "test"):
        converted = data.load_split(_digits_config(tmp_path).dataset, split)
        reference = data.load_split(_digits_config(digits_data_dir).dataset, split)
        assert not isinstance(converted.examples, data.Arrays)  # read by random access
        indices = np.arange(reference.num_examples)
        for a, b in zip(converted.examples.read(indices), reference.examples.read(indices),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    # Converting again into a prepared copy is refused, with one line.
    assert convert_dataset.main(["--name=sklearn_digits", f"--data_dir={digits_tfrecord_dir}",
                                 f"--out_dir={tmp_path}"]) == 2


def test_host_resize_batches_images_of_mixed_sizes():
    """config.dataset.image_size: ImageNet-like datasets whose images differ in size still batch."""
    images = [np.full((h, w, 3), 200, np.uint8) for h, w in ((40, 60), (33, 20), (64, 64))]
    batch = np.stack([data.fixed_size(image, 32) for image in images])
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    assert (batch == 200).all()  # a constant image stays constant
    assert data.fixed_size(images[2], 64) is images[2]


def test_missing_image_key_is_a_clear_error(digits_data_dir):
    config = _digits_config(digits_data_dir, **{"dataset.image_key": "img"})
    with pytest.raises(UserError, match=r"has features \['image', 'label'\]: set config.dataset"):
        data.load_split(config.dataset, "test")


def _launch(args, env, timeout=300):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_training_runs_without_tensorflow(tmp_path, digits_data_dir, digits_tfrecord_dir,
                                          no_tensorflow_env):
    """No module that training, evaluation, attend or summary imports imports TensorFlow: a short
    run with its attention maps, its evaluation, --mode=attend and --mode=summary, each in a process
    where TensorFlow is not installed."""
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=no_tensorflow_env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    small = ["--config.dataset.train_split=train[:256]", "--config.num_epochs=1",
             "--config.model.dim=16", "--config.steps_per_call=4", "--config.attention_every_epochs=1"]
    common = ["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'run'}",
              f"--config.dataset.data_dir={digits_data_dir}", *small]
    trained = _launch(common, no_tensorflow_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "4 step(s) per call, training data on the devices" in trained.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "attention" / "epoch_001.png").exists()
    evaluated = _launch([*common, "--mode=eval", "--checkpoint=latest"], no_tensorflow_env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test/top1" in evaluated.stdout
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    attended = _launch([*common, "--mode=attend", f"--image={image}", "--checkpoint=latest"],
                       no_tensorflow_env)
    assert attended.returncode == 0, attended.stderr[-3000:]
    assert (tmp_path / "run" / "attend" / "digit.png").exists()
    summary = _launch([*common, "--mode=summary"], no_tensorflow_env)
    assert summary.returncode == 0 and "total params:" in summary.stdout, summary.stderr[-3000:]

    # A dataset prepared as TFRecord: one line saying how to convert it, exit status 2.
    refused = _launch(["--config=experiments/patch_convnet.py:smoke", f"--workdir={tmp_path / 'tf'}",
                       f"--config.dataset.data_dir={digits_tfrecord_dir}"], no_tensorflow_env)
    assert refused.returncode == 2
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "prepared as TFRecord" in error[0]
    assert "python -m attn_jax.convert_dataset --name=sklearn_digits" in error[0]
