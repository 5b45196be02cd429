"""Per-example random image transforms, run on the device inside the jitted step.

Each transform takes one float image `[H, W, C]` holding raw pixel values (0..255) and a PRNG key
and returns the transformed image; `attn_jax.preprocess` vmaps them over the batch. Geometric
transforms come from dm-pix; the Keras-layer equivalents they reproduce are named in each docstring.
"""

import dm_pix as pix
import jax
import jax.numpy as jnp


def random_crop(image: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """A `size` x `size` window at a uniformly random offset (keras RandomCrop): [H, W, C] -> [s, s, C]."""
    return pix.random_crop(key, image, (size, size, image.shape[-1]))


def random_flip(image: jax.Array, key: jax.Array) -> jax.Array:
    """Mirror left-right with probability 1/2 (keras RandomFlip("horizontal")): [H, W, C] -> same."""
    return pix.random_flip_left_right(key, image)


# Keras 3 geometric and photometric layers used by the EANet tutorial. Geometric transforms pull
# each output pixel from the input through an affine map about the image centre ((H-1)/2, (W-1)/2),
# with bilinear interpolation and Keras' "reflect" fill (d c b a | a b c d | d c b a), which is
# `map_coordinates` mode "reflect". They call `jax.scipy.ndimage.map_coordinates` per channel
# directly: dm-pix's `affine_transform` also falls back to it for "reflect", but over 3-D (H, W, C)
# coordinates, interpolating along the channel axis too. A factor of 0 (a Python number) returns
# the image untouched.


def _is_static_zero(factor) -> bool:
    return isinstance(factor, int | float) and factor == 0


def _sample(image: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear samples of `image` [H, W, C] at float coordinates [H, W] (reflect fill) -> same."""
    def one_channel(channel):
        return jax.scipy.ndimage.map_coordinates(channel, [rows, cols], order=1, mode="reflect")

    return jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image)


def _centred_grid(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Output pixel coordinates relative to the image centre: two [H, W] float32 arrays."""
    height, width = image.shape[:2]
    rows = jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2
    cols = jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2
    return tuple(jnp.meshgrid(rows, cols, indexing="ij"))


def rotate(image: jax.Array, angle: jax.Array) -> jax.Array:
    """Rotation by `angle` radians about the centre, bilinear, reflect fill: [H, W, C] -> same.

    Output pixel (x, y) reads input (cx + cos * (x - cx) - sin * (y - cy), cy + sin * (x - cx) +
    cos * (y - cy)) in (col, row) coordinates, Keras' rotation matrix for the same angle. At angle 0
    the sampling coordinates are the integer pixel positions, so the output is exact.
    """
    rows, cols = _centred_grid(image)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cy, cx = (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    return _sample(image, cos * rows + sin * cols + cy, cos * cols - sin * rows + cx)


def zoom(image: jax.Array, height_zoom: jax.Array, width_zoom: jax.Array) -> jax.Array:
    """Scale the sampling grid about the centre (zoom > 1 zooms out): [H, W, C] -> same.

    Output pixel (i, j) reads input (cy + height_zoom * (i - cy), cx + width_zoom * (j - cx)), as
    Keras' zoom matrix; bilinear, reflect fill. Zooms of 1 give exactly the input.
    """
    rows, cols = _centred_grid(image)
    cy, cx = (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    return _sample(image, height_zoom * rows + cy, width_zoom * cols + cx)


def random_rotation(image: jax.Array, key: jax.Array, factor: float) -> jax.Array:
    """Rotate by an angle uniform in [-factor, factor] * 2 pi (keras RandomRotation(factor)).

    factor 0.1 rotates by up to +-36 degrees; [H, W, C] -> same.
    """
    if _is_static_zero(factor):
        return image
    turns = jax.random.uniform(key, (), minval=-factor, maxval=factor)
    return rotate(image, turns * 2 * jnp.pi)


def random_zoom(image: jax.Array, key: jax.Array, height_factor: float,
                width_factor: float) -> jax.Array:
    """Independent height and width zooms uniform in [1 - f, 1 + f] (keras 3 RandomZoom(hf, wf)).

    [H, W, C] -> same; a zoom above 1 shows more of the (reflected) image, below 1 less.
    """
    if _is_static_zero(height_factor) and _is_static_zero(width_factor):
        return image
    height_key, width_key = jax.random.split(key)
    height_zoom = jax.random.uniform(height_key, (), minval=1 - height_factor,
                                     maxval=1 + height_factor)
    width_zoom = jax.random.uniform(width_key, (), minval=1 - width_factor,
                                    maxval=1 + width_factor)
    return zoom(image, height_zoom, width_zoom)


def random_contrast(image: jax.Array, key: jax.Array, factor: float) -> jax.Array:
    """Contrast scaled by f uniform in [1 - factor, 1 + factor] (keras 3 RandomContrast(factor)).

    out = (x - mean) * f + mean per channel (mean over H and W), clipped to the raw-pixel range
    [0, 255]; computed as x * f + mean * (1 - f), which is exactly x at f = 1. [H, W, C] -> same.
    """
    if _is_static_zero(factor):
        return image
    f = jax.random.uniform(key, (), minval=1 - factor, maxval=1 + factor, dtype=image.dtype)
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return jnp.clip(image * f + mean * (1 - f), 0, 255)
