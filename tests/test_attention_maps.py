"""attn_jax/attention_maps.py: pictures rendered from arrays alone (no model), at fixed pixel sizes.
The grid training writes is tested in test_inference.py, --mode=attend's pictures in test_modes.py."""

import json

import numpy as np
import pytest
from conftest import inches_to_pixels, png_size

from attn_jax import attention_maps


def _attention(n, patches, seed=0):
    weights = np.random.default_rng(seed).random((n, patches)).astype(np.float32)
    return weights / weights.sum(-1, keepdims=True)


def test_attention_grid_is_square_or_refused():
    assert attention_maps.attention_grid(_attention(3, 16)).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="12 patches do not make a square grid"):
        attention_maps.attention_grid(_attention(3, 12))


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (6, (2, 3)), (9, (3, 3)), (10, (3, 4))])
def test_grid_shape_is_as_square_as_possible(n, shape):
    assert attention_maps.grid_shape(n) == shape


def test_render_grid_writes_a_png_of_the_announced_size(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), np.uint8)
    path = tmp_path / "grid" / "epoch_001.png"
    pixels = attention_maps.render_grid(images, _attention(6, 16), [f"image {i}" for i in range(6)],
                                        path, suptitle="epoch 1", colors=["green", "red"] * 3)
    assert png_size(path) == attention_maps.grid_pixels(6)
    assert pixels.shape == (*attention_maps.grid_pixels(6)[::-1], 3) and pixels.dtype == np.uint8


def test_epoch_grid_titles_each_image_with_its_classes_and_counts_the_right_ones(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]], np.float32)
    drawn = {}
    monkeypatch.setattr(attention_maps, "render_grid", lambda *args, **kw: drawn.update(
        titles=args[2], **kw))
    attention_maps.render_epoch_grid(images, np.array([0, 1, 1]), probs, _attention(3, 16),
                                     ["cat", "dog", "fox"], "model, epoch 2", tmp_path / "g.png")
    assert drawn["titles"] == ["true cat\npred cat (70%)", "true dog\npred fox (60%)",
                               "true dog\npred dog (50%)"]
    assert drawn["colors"] == ["green", "red", "green"]
    assert drawn["suptitle"] == "model, epoch 2: 2/3 correct (green)"


def test_render_side_by_side_writes_a_png_of_a_fixed_size(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (101, 67, 3), np.uint8)  # any size
    path = tmp_path / "attend" / "photo.png"
    attention_maps.render_side_by_side(image, _attention(1, 16)[0], path, "photo.jpg: 7 (42.0%)")
    assert png_size(path) == inches_to_pixels(attention_maps.ATTEND_INCHES)


def test_curves_weight_train_records_by_their_steps(tmp_path):
    records = [{"step": 10, "epoch": 1, "train/loss": 2.0, "train/top1": 0.1},
               {"step": 40, "epoch": 1, "train/loss": 1.0, "train/top1": 0.5},
               {"step": 40, "epoch": 1, "val/loss": 1.5, "val/top1": 0.4},
               {"step": 80, "epoch": 2, "train/loss": 0.5, "train/top1": 0.8},
               {"step": 80, "epoch": 2, "val/loss": 1.0, "val/top1": 0.6},
               {"step": 80, "epoch": 2, "test/loss": 1.1, "test/top1": 0.55}]
    means = attention_maps._epoch_means(records, "train")
    assert means[1] == pytest.approx({"loss": (10 * 2.0 + 30 * 1.0) / 40, "top1": (1 + 15) / 40})
    assert means[2] == pytest.approx({"loss": 0.5, "top1": 0.8})
    assert attention_maps._epoch_means(records, "val") == {1: {"loss": 1.5, "top1": 0.4},
                                                           2: {"loss": 1.0, "top1": 0.6}}
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = attention_maps.plot_curves(metrics, tmp_path / "curves.png")
    assert png_size(out) == inches_to_pixels(attention_maps.CURVES_INCHES)
