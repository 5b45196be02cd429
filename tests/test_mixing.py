"""Mixup and CutMix (`attn_jax/mixing.py`): CutMix's weight is its box's area, Mixup with alpha -> 0
returns one of the two images, the targets through the label-smoothed loss, and the whole modern
stack (RandAugment, random erasing, Mixup/CutMix) on 8 devices as on 1."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import random_batches, run_steps, tiny_patch_convnet_config

from attn_jax import mixing, train

# Image i is the constant i, so each mixed pixel says where it came from.
IMAGES = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32)[:, None, None, None], (6, 10, 8, 3))
LABELS = jnp.array([0, 1, 2, 3, 4, 5])


def _cfg(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0):
    return ml_collections.ConfigDict(dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                          switch_prob=switch_prob, prob=prob))


def test_off_unless_an_alpha_is_on():
    assert not mixing.enabled(None) and not mixing.enabled(_cfg())
    assert mixing.enabled(_cfg(mixup_alpha=0.8)) and mixing.enabled(_cfg(cutmix_alpha=1.0))


def test_cutmix_label_weight_is_the_box_area():
    boxes = 0
    for seed in range(10):
        images, targets, dominant = mixing.mix_batch(IMAGES, LABELS, 6, jax.random.key(seed),
                                                     _cfg(cutmix_alpha=1.0))
        own = np.asarray(images[:, :, :, 0] == IMAGES[:, :, :, 0])  # [B, H, W]
        partner = np.asarray(images[:, :, :, 0] == IMAGES[::-1, :, :, 0])
        assert np.all(own | partner)
        lam = float(targets[0, 0])
        np.testing.assert_allclose(own[0].mean(), lam, atol=1e-6)  # weight = 1 - box area
        np.testing.assert_allclose(targets[0, 5], 1 - lam, atol=1e-6)  # partner of 0 is 5
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
        assert int(dominant[0]) == (0 if lam >= 0.5 else 5)
        boxes += lam < 1
    assert boxes >= 5


def test_mixup_with_alpha_near_zero_returns_one_of_the_two_images():
    seen = set()
    for seed in range(12):
        images, targets, _ = mixing.mix_batch(IMAGES, LABELS, 6, jax.random.key(seed),
                                              _cfg(mixup_alpha=1e-3))
        if np.allclose(images, IMAGES, atol=1e-3):
            seen.add("own")
        else:
            np.testing.assert_allclose(images, IMAGES[::-1], atol=1e-3)
            seen.add("partner")
        lam = float(targets[0, 0])
        assert min(lam, 1 - lam) < 1e-3
    assert seen == {"own", "partner"}


def test_no_mixing_with_probability_zero():
    images, targets, dominant = mixing.mix_batch(IMAGES, LABELS, 6, jax.random.key(0),
                                                 _cfg(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0))
    np.testing.assert_array_equal(images, IMAGES)
    np.testing.assert_array_equal(targets, jax.nn.one_hot(LABELS, 6))
    np.testing.assert_array_equal(dominant, LABELS)


def test_soft_cross_entropy_of_mixed_targets_is_the_mix_of_the_losses():
    """The loss the train step takes: one-hot targets give `cross_entropy`, and a mixed target the
    same mix of the two label-smoothed losses (timm's mixup_target with smoothing)."""
    logits = jax.random.normal(jax.random.key(0), (6, 6))
    onehot = jax.nn.one_hot(LABELS, 6)
    for smoothing in (0.0, 0.1):
        np.testing.assert_allclose(train.soft_cross_entropy(logits, onehot, smoothing),
                                   train.cross_entropy(logits, LABELS, smoothing), rtol=1e-6)
        lam = 0.3
        mixed = train.soft_cross_entropy(logits, lam * onehot + (1 - lam) * onehot[::-1], smoothing)
        expected = (lam * train.cross_entropy(logits, LABELS, smoothing)
                    + (1 - lam) * train.cross_entropy(logits, LABELS[::-1], smoothing))
        np.testing.assert_allclose(mixed, expected, rtol=1e-5)
        off = smoothing / 6  # timm: off_value = smoothing / classes, on = 1 - smoothing + off
        timm_targets = lam * (onehot * (1 - smoothing) + off) + (1 - lam) * (
            onehot[::-1] * (1 - smoothing) + off)
        np.testing.assert_allclose(mixed, optax.softmax_cross_entropy(logits, timm_targets),
                                   rtol=1e-5)


MODERN_STACK = {"preprocess.randaugment_ops": 2, "preprocess.randaugment_magnitude": 9.0,
                "preprocess.randaugment_magnitude_std": 0.5, "preprocess.erase_prob": 0.5,
                "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0}


@pytest.fixture(scope="module")
def plain_losses() -> list[float]:
    """The losses of the steps of the modern-stack test without the stack (one compile for both
    of its cases)."""
    losses, _ = run_steps(tiny_patch_convnet_config(), train.create_mesh(), random_batches(2),
                          evaluated=False)
    return losses


@pytest.mark.slow  # an 8-device and a 1-device compilation of the whole stack: 10 s each
@pytest.mark.parametrize("switch_prob", [0.0, 1.0], ids=["mixup", "cutmix"])
def test_eight_devices_match_one_device_with_the_modern_stack(tiny_config, switch_prob,
                                                               plain_losses):
    assert jax.device_count() == 8, "conftest.py fakes 8 CPU devices"
    config = tiny_config(**MODERN_STACK, **{"mixup.switch_prob": switch_prob})
    batches = random_batches(2)
    one_losses, _ = run_steps(config, train.create_mesh(jax.devices()[:1]), batches, evaluated=False)
    eight_losses, _ = run_steps(config, train.create_mesh(), batches, evaluated=False)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=2e-5)
    assert not np.allclose(plain_losses, one_losses)  # the stack did change the inputs
