"""attn_jax/inference.py: a model's predictions and attention maps on images, and the grid of them
that training writes after each epoch."""

import jax
import numpy as np
import pytest
from conftest import digits_config, inches_to_pixels, load_experiment, png_size
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attn_jax import attention_maps, data, inference, registry, train
from attn_jax.errors import UserError

# A tiny PatchConvNet on 480 digits (16x16 inputs -> 4x4 = 16 patches), 2 epochs, a grid of 6
# validation images after each epoch.
OVERRIDES = {"dataset.train_split": "train[:480]", "dataset.val_split": "train[1150:1278]",
             "dataset.test_split": "test[:128]", "batch_size": 32, "eval_batch_size": 64,
             "num_epochs": 2, "log_every_steps": 5, "preprocess.size": 16,
             "preprocess.train_resize": 18, "preprocess.crop": 16, "model.dim": 16,
             "attention_every_epochs": 1, "attention_images": 6}


def _config(data_dir):
    return digits_config(data_dir, OVERRIDES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
    """A finished run, trained in this process, with every call of `fixed_images` recorded."""
    workdir = tmp_path_factory.mktemp("attention")
    calls = []
    original = inference.fixed_images

    def recording(split, n):
        calls.append(original(split, n))
        return calls[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "fixed_images", recording)
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    return workdir, calls


@pytest.mark.slow
def test_training_writes_the_grid_of_the_same_images_every_epoch(trained, digits_data_dir):
    workdir, calls = trained
    assert sorted(p.name for p in (workdir / "attention").iterdir()) == ["epoch_001.png",
                                                                          "epoch_002.png"]
    for name in ("epoch_001.png", "epoch_002.png"):
        assert png_size(workdir / "attention" / name) == attention_maps.grid_pixels(6)
    assert len(calls) == 2  # one per epoch, the same images and labels each time
    np.testing.assert_array_equal(calls[0][0], calls[1][0])
    np.testing.assert_array_equal(calls[0][1], calls[1][1])
    assert calls[0][0].shape == (6, 32, 32, 3) and calls[0][0].dtype == np.uint8
    # ... the first 6 of the validation split, in order
    split = data.load_split(_config(digits_data_dir).dataset, OVERRIDES["dataset.val_split"])
    first = next(data.eval_batches(split, 64))
    np.testing.assert_array_equal(calls[0][0], first["images"][:6])
    np.testing.assert_array_equal(calls[0][1], first["labels"][:6])
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("attention_maps")] == [15, 30]  # 480 // 32 per epoch
    assert png_size(workdir / "curves.png") == inches_to_pixels(attention_maps.CURVES_INCHES)  # (1000, 400)
    assert (workdir / "summary.json").exists()


def test_attention_sums_to_one_over_the_patches(digits_data_dir):
    config = _config(digits_data_dir)
    split = data.load_split(config.dataset, OVERRIDES["dataset.val_split"])
    images, labels = inference.fixed_images(split, 6)
    assert images.shape == (6, 32, 32, 3) and labels.shape == (6,)
    model = registry.create_model(config, 10)
    params = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)["params"]
    probs, attention = inference.predict(model, params, images, config.preprocess)
    assert attention.shape == (6, 16)  # 16x16 inputs, two stride-2 convs: 4x4 patches
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert (attention >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_fixed_images_are_the_first_of_the_split():
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    split = data.Split("toy", data.Arrays(images, np.arange(5, dtype=np.int32)), (2, 2, 3), 0)
    got, labels = inference.fixed_images(split, 3)
    np.testing.assert_array_equal(got, images[:3])
    np.testing.assert_array_equal(labels, [0, 1, 2])
    assert len(inference.fixed_images(split, 16)[1]) == 5  # at most the split
    empty = data.Split("none", data.Arrays(images[:0], np.zeros(0, np.int32)), (2, 2, 3), 0)
    with pytest.raises(UserError, match="the validation split is empty"):
        inference.fixed_images(empty, 3)


@pytest.mark.parametrize("experiment, expected", [("patch_convnet", True), ("eanet", False),
                                                  ("vit", False)])
def test_has_attention_map(experiment, expected):
    assert inference.has_attention_map(load_experiment(experiment, "smoke")) is expected


def test_to_model_input_resizes_any_image_to_the_dataset_size():
    image = np.random.default_rng(0).integers(0, 256, (101, 67, 3), np.uint8)
    resized = inference.to_model_input(image, (32, 32))
    assert resized.shape == (32, 32, 3) and resized.dtype == np.uint8
    assert inference.to_model_input(image, (101, 67)) is image  # already the size: as it is
