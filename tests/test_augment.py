"""The augmentations (`attn_jax/augment.py`): crops and flips, the EANet tutorial's rotation, zoom
and contrast on one raw-pixel image, timm's RandAugment ops (against PIL, which timm runs) and
random erasing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


RGB = jnp.asarray(np.random.default_rng(3).integers(0, 256, (13, 11, 3)), jnp.float32)


def test_rand_augment_without_ops_is_the_identity():
    np.testing.assert_array_equal(augment.rand_augment(RGB, KEY, 0, 0.0, 0.0), RGB)
    np.testing.assert_array_equal(augment.rand_augment(RGB, KEY, 0, 9.0, 0.5), RGB)


# timm's "increasing" ops whose change grows from none at magnitude 0 (the others, AutoContrast,
# Equalize, Invert and PosterizeIncreasing, which keeps 4 bits there, change the image at any level).
GROWING_OPS = ["Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
               "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
               "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.mark.parametrize("name", GROWING_OPS)
def test_growing_ops_at_magnitude_zero_are_the_identity_and_change_the_image_at_nine(name):
    op = augment.RAND_INCREASING_OPS[name]
    for sign in (1.0, -1.0):
        np.testing.assert_allclose(op(RGB, jnp.float32(0), jnp.float32(sign)), RGB, atol=1e-3)
    assert not np.allclose(op(RGB, jnp.float32(9), jnp.float32(1)), RGB, atol=1.0)


def test_rand_augment_is_deterministic_per_key_and_differs_between_keys():
    out = [augment.rand_augment(RGB, jax.random.key(seed), 2, 9.0, 0.5) for seed in range(6)]
    np.testing.assert_array_equal(out[0], augment.rand_augment(RGB, jax.random.key(0), 2, 9.0, 0.5))
    assert len({np.asarray(o).tobytes() for o in out}) > 2
    assert all(o.shape == RGB.shape and float(o.min()) >= 0 and float(o.max()) <= 255 for o in out)


def _pil_cases():
    from PIL import Image, ImageEnhance, ImageOps

    affine = dict(resample=Image.BILINEAR, fillcolor=(128, 128, 128))

    def transform(matrix):
        return lambda im: im.transform(im.size, Image.AFFINE, matrix, **affine)

    return [
        ("auto_contrast", augment.auto_contrast, ImageOps.autocontrast),
        ("equalize", augment.equalize, ImageOps.equalize),
        ("invert", augment.invert, ImageOps.invert),
        ("posterize 2", lambda x: augment.posterize(x, 2), lambda im: ImageOps.posterize(im, 2)),
        ("solarize 100", lambda x: augment.solarize(x, 100), lambda im: ImageOps.solarize(im, 100)),
        ("color 0.3", lambda x: augment.color(x, 0.3),
         lambda im: ImageEnhance.Color(im).enhance(0.3)),
        ("contrast 1.7", lambda x: augment.contrast(x, 1.7),
         lambda im: ImageEnhance.Contrast(im).enhance(1.7)),
        ("brightness 1.4", lambda x: augment.brightness(x, 1.4),
         lambda im: ImageEnhance.Brightness(im).enhance(1.4)),
        ("sharpness 1.9", lambda x: augment.sharpness(x, 1.9),
         lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
        ("shear x", lambda x: augment.pil_affine(x, (1, 0.25, 0, 0, 1, 0)),
         transform((1, 0.25, 0, 0, 1, 0))),
        ("translate y", lambda x: augment.pil_affine(x, (1, 0, 0, 0, 1, -3.3)),
         transform((1, 0, 0, 0, 1, -3.3))),
        ("rotate 17", lambda x: augment.pil_rotate(x, 17.0), lambda im: im.rotate(17.0, **affine)),
    ]


def test_rand_augment_ops_match_pil_on_uint8_images():
    """Each op on an image of whole levels against PIL's operation, which timm applies: within one
    level and a half (PIL rounds to uint8 after each of its steps; attn_jax stays float)."""
    from PIL import Image

    image = np.asarray(RGB, np.uint8).copy()
    image[..., 1] = image[..., 1] // 3 + 40  # a channel of narrower range (AutoContrast, Equalize)
    for name, ours, pil in _pil_cases():
        expected = np.asarray(pil(Image.fromarray(image)), np.float32)
        got = np.asarray(ours(jnp.asarray(image, jnp.float32)))
        np.testing.assert_allclose(got, expected, atol=1.5, err_msg=name)


def test_random_erasing_replaces_one_box_and_nothing_else():
    area, aspect = (0.02, 1 / 3), (0.3, 1 / 0.3)
    image = jax.random.normal(KEY, (16, 12, 3))  # a normalised image
    erased = 0
    for seed in range(8):
        key = jax.random.key(seed)
        out = augment.random_erase(image, key, 1.0, area, aspect)
        box, fits = augment.erase_box(jax.random.split(key, 3)[1], 16, 12, area, aspect)
        np.testing.assert_array_equal(np.asarray(out)[~np.asarray(box)],
                                      np.asarray(image)[~np.asarray(box)])
        if fits:
            rows, cols = np.nonzero(np.asarray(box))
            assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a rectangle
            assert not np.any(np.asarray(out)[np.asarray(box)] == np.asarray(image)[np.asarray(box)])
            erased += 1
    assert erased >= 6
    np.testing.assert_array_equal(augment.random_erase(image, KEY, 0.0, area, aspect), image)
