"""Attention maps: the grid written during training, --mode=attend on any image, curves, bad input."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, load_experiment
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attn_jax import attention_maps, data, train
from attn_jax.errors import UserError

# A tiny PatchConvNet on 480 digits (16x16 inputs -> 4x4 = 16 patches), 2 epochs, a grid of 6
# validation images after each epoch.
OVERRIDES = {"dataset.train_split": "train[:480]", "dataset.val_split": "train[1150:1278]",
             "dataset.test_split": "test[:128]", "batch_size": 32, "eval_batch_size": 64,
             "num_epochs": 2, "log_every_steps": 5, "preprocess.size": 16,
             "preprocess.train_resize": 18, "preprocess.crop": 16, "model.dim": 16,
             "attention_every_epochs": 1, "attention_images": 6}


def _config(data_dir):
    config = load_experiment("patch_convnet", "smoke")
    config.dataset.data_dir = str(data_dir)
    for key, value in OVERRIDES.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
    """A finished run, trained in this process, with every call of `fixed_images` recorded."""
    workdir = tmp_path_factory.mktemp("attention")
    calls = []
    original = attention_maps.fixed_images

    def recording(split, n):
        calls.append(original(split, n))
        return calls[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_maps, "fixed_images", recording)
        train.train_and_evaluate(_config(digits_data_dir), str(workdir))
    return workdir, calls


def _pixels(inches):
    return tuple(round(x * attention_maps.DPI) for x in inches)


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_training_writes_the_grid_of_the_same_images_every_epoch(trained, digits_data_dir):
    workdir, calls = trained
    assert sorted(p.name for p in (workdir / "attention").iterdir()) == ["epoch_001.png",
                                                                          "epoch_002.png"]
    for name in ("epoch_001.png", "epoch_002.png"):
        assert _png(workdir / "attention" / name) == attention_maps.grid_pixels(6)
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
    assert _png(workdir / "curves.png") == _pixels(attention_maps.CURVES_INCHES)  # (1000, 400)
    assert (workdir / "summary.json").exists()


def test_attention_sums_to_one_over_the_patches(trained, digits_data_dir):
    workdir, calls = trained
    config = _config(digits_data_dir)
    model = train.create_model(config, 10)
    params = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)["params"]
    probs, attention = attention_maps.predict(model, params, calls[0][0], config.preprocess)
    assert attention.shape == (6, 16)  # 16x16 inputs, two stride-2 convs: 4x4 patches
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert (attention >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def _images(directory):
    """A grayscale PNG, an RGBA PNG and an odd-sized RGB JPEG."""
    rng = np.random.default_rng(0)
    paths = [directory / "gray.png", directory / "rgba.png", directory / "photo.jpg"]
    Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8), "L").save(paths[0])
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), np.uint8), "RGBA").save(paths[1])
    Image.fromarray(rng.integers(0, 256, (101, 67, 3), np.uint8), "RGB").save(paths[2])
    return paths


def test_attend_on_any_image(trained, digits_data_dir, tmp_path):
    workdir, _ = trained
    results = attention_maps.attend(_config(digits_data_dir), workdir, _images(tmp_path), "latest")
    assert [r["output"] for r in results] == [str(workdir / "attend" / f"{n}.png")
                                              for n in ("gray", "rgba", "photo")]
    for result in results:
        assert _png(result["output"]) == _pixels(attention_maps.ATTEND_INCHES)
        assert len(result["top5"]) == 5
        assert {name for name, _ in result["top5"]} <= {str(d) for d in range(10)}
        probs = [p for _, p in result["top5"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert attention_maps.format_result(results[0]).splitlines()[1].startswith("  1. ")


def _no_attention_config(name, data_dir):
    """experiments/<name>.py:smoke if it exists, else the tutorial's smoke run with that model."""
    if (ROOT / "experiments" / f"{name}.py").exists():
        config = load_experiment(name, "smoke")
    else:
        config = load_experiment("patch_convnet", "smoke")
        config.model = {"name": "eanet", "patch_size": 4, "dim": 16, "mlp_dim": 32, "num_heads": 2,
                        "dim_coefficient": 2, "num_blocks": 1, "attention_dropout": 0.0,
                        "projection_dropout": 0.0, "memory_slots": 8,
                        "attention": "self" if name == "vit" else "external"}
    config.dataset.data_dir = str(data_dir)
    return config


def test_bad_input_is_a_clear_error(trained, digits_data_dir, tmp_path):
    workdir, _ = trained
    config = _config(digits_data_dir)
    good = _images(tmp_path)[0]
    (tmp_path / "x.png").write_text("not an image\n")
    with pytest.raises(UserError, match=r"--image=.*missing.png: no such file"):
        attention_maps.attend(config, workdir, [str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match=r"--image=.*x.png: not an image file"):
        attention_maps.attend(config, workdir, [str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="at least one --image"):
        attention_maps.attend(config, workdir, [])
    (tmp_path / "empty").mkdir()
    for empty in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(UserError, match="no checkpoint in .*train there first"):
            attention_maps.attend(config, empty, [str(good)])
    for name in ("eanet", "vit"):
        with pytest.raises(UserError, match=r"model 'eanet' has no attention map: "
                                            r"--mode=attend needs a PatchConvNet"):
            attention_maps.attend(_no_attention_config(name, digits_data_dir), workdir, [str(good)])


def test_launch_attend_with_a_missing_image_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke",
         f"--workdir={tmp_path}", "--mode=attend", f"--image={tmp_path / 'nope.jpg'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --image={tmp_path / 'nope.jpg'}: no such file"]
    assert "Traceback" not in result.stderr


def test_sixteen_bit_grey_images_are_rescaled_not_clipped(tmp_path):
    """A 16-bit PNG's grey levels (0..65535) become 0..255: PIL's convert("RGB") clips them to
    white. 32-bit float levels have no fixed range and are refused."""
    levels = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    rgb = attention_maps.read_image(tmp_path / "grey16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128, 255]])
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match="grey levels beyond 16 bits have no fixed range"):
        attention_maps.read_image(tmp_path / "float.tiff")
