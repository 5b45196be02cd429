"""The augmentations (`attn_jax/augment.py`): crops and flips, and the EANet tutorial's rotation,
zoom and contrast on one raw-pixel image."""

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import augment

IMAGE = jax.random.uniform(jax.random.key(7), (12, 10, 3), maxval=255.0)
KEY = jax.random.key(11)


def test_zero_factors_are_identity():
    np.testing.assert_array_equal(augment.random_rotation(IMAGE, KEY, 0.0), IMAGE)
    np.testing.assert_array_equal(augment.random_zoom(IMAGE, KEY, 0.0, 0.0), IMAGE)
    np.testing.assert_array_equal(augment.random_contrast(IMAGE, KEY, 0.0), IMAGE)
    # The math itself is exact at angle 0, zoom 1 (no short-circuit there).
    np.testing.assert_array_equal(augment.rotate(IMAGE, jnp.float32(0)), IMAGE)
    np.testing.assert_array_equal(augment.zoom(IMAGE, jnp.float32(1), jnp.float32(1)), IMAGE)


def test_flip_twice_is_identity():
    once = augment.random_flip(IMAGE, KEY)
    np.testing.assert_array_equal(augment.random_flip(once, KEY), IMAGE)


def test_rotation_of_constant_image_stays_constant():
    constant = jnp.full((12, 10, 3), 200.0)
    rotated = augment.rotate(constant, jnp.float32(np.deg2rad(30)))  # corners fall outside
    np.testing.assert_allclose(rotated, 200.0, rtol=1e-5)
    np.testing.assert_allclose(augment.random_rotation(constant, KEY, 0.1), 200.0, rtol=1e-5)


def test_rotation_by_180_degrees_flips_both_axes():
    np.testing.assert_allclose(augment.rotate(IMAGE, jnp.float32(np.pi)), IMAGE[::-1, ::-1],
                               atol=1e-3)


def test_contrast_stays_in_pixel_range():
    for seed in range(3):
        out = augment.random_contrast(IMAGE, jax.random.key(seed), 0.9)
        assert out.shape == IMAGE.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
        assert not np.allclose(out, IMAGE)


def test_zoom_changes_image_and_keeps_shape():
    out = augment.random_zoom(IMAGE, KEY, 0.2, 0.2)
    assert out.shape == IMAGE.shape
    assert not np.allclose(out, IMAGE)
    # zoom out by 2 about the centre: the centre pixel stays, its neighbour reads two pixels away
    odd = jax.random.uniform(KEY, (9, 9, 3), maxval=255.0)
    zoomed = augment.zoom(odd, jnp.float32(2), jnp.float32(2))
    np.testing.assert_allclose(zoomed[4, 4], odd[4, 4], rtol=1e-6)
    np.testing.assert_allclose(zoomed[4, 5], odd[4, 6], rtol=1e-6)


def test_random_crop_is_a_window_of_the_image():
    image = jnp.arange(10 * 10 * 1, dtype=jnp.float32).reshape(10, 10, 1)
    for seed in range(20):
        crop = augment.random_crop(image, jax.random.key(seed), 6)
        top, left = int(crop[0, 0, 0]) // 10, int(crop[0, 0, 0]) % 10
        assert 0 <= top <= 4 and 0 <= left <= 4
        np.testing.assert_array_equal(crop, image[top:top + 6, left:left + 6])


def test_random_flip_is_identity_or_mirror_and_both_occur():
    image = jax.random.uniform(jax.random.key(0), (5, 7, 3))
    outcomes = set()
    for seed in range(20):
        out = augment.random_flip(image, jax.random.key(seed))
        if jnp.array_equal(out, image):
            outcomes.add("same")
        else:
            np.testing.assert_array_equal(out, image[:, ::-1])
            outcomes.add("mirror")
    assert outcomes == {"same", "mirror"}
