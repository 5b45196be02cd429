"""attn_jax/preprocess.py, device-side preprocessing: per-example keys, deterministic evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import preprocess
from attn_jax.config import base


def _cfg(**kw):
    """config.preprocess of the base config, 8x8, no augmentation, then `kw`."""
    cfg = base().preprocess
    cfg.update({**dict(size=8, train_resize=8, crop=0, flip=False, rotation=0.0, contrast=0.0,
                       zoom=0.0, normalize="rescale"), **kw})
    return cfg


def _images(n=4, size=8):
    return jax.random.randint(jax.random.key(0), (n, size, size, 3), 0, 256).astype(jnp.uint8)


def test_train_crops_differ_per_example_and_per_key():
    images = jnp.broadcast_to(_images(1, 8), (4, 8, 8, 3))  # 4 copies of one image
    cfg = _cfg(train_resize=12, crop=8, flip=True)
    out = preprocess.for_train(images, jax.random.key(0), cfg)
    assert out.shape == (4, 8, 8, 3)
    assert len({np.asarray(o).tobytes() for o in out}) > 1  # one key per example
    again = preprocess.for_train(images, jax.random.key(0), cfg)
    np.testing.assert_array_equal(out, again)


def test_eval_preprocessing_is_deterministic_rescale_and_resize():
    images = _images(2, 8)
    cfg = _cfg(size=12)
    out = preprocess.for_eval(images, cfg)
    assert out.shape == (2, 12, 12, 3)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, preprocess.for_eval(images, cfg))
    np.testing.assert_allclose(preprocess.for_eval(images, _cfg(size=8)), images / 255.0, rtol=1e-6)


@pytest.mark.parametrize("normalize", ["rescale", "standardize", "imagenet"])
def test_training_equals_eval_with_random_steps_off(normalize):
    stats = {"mean": jnp.array([120.0, 110.0, 100.0]), "std": jnp.array([60.0, 55.0, 50.0])}
    images = _images(3, 8)
    # Every random step switched off by its config value, as an experiment would set them.
    cfg = _cfg(size=10, normalize=normalize, crop=0, flip=False, rotation=0.0, contrast=0.0,
               zoom=0.0)
    np.testing.assert_allclose(preprocess.for_train(images, jax.random.key(1), cfg, stats),
                               preprocess.for_eval(images, cfg, stats), rtol=1e-6)


def test_imagenet_normalisation_is_timms():
    """DeiT's and the official PatchConvNet weights' inputs: (x / 255 - mean) / std per channel
    with timm's IMAGENET_DEFAULT_MEAN (0.485, 0.456, 0.406) and STD (0.229, 0.224, 0.225)."""
    pixel = jnp.array([[[[0.0, 127.5, 255.0]]]])
    out = preprocess.normalize(pixel, _cfg(normalize="imagenet"), None)
    want = [(0.0 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
    np.testing.assert_allclose(out[0, 0, 0], want, rtol=1e-6)
