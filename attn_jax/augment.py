"""Per-example random image transforms, run on the device inside the jitted step.

Each transform takes one float image `[H, W, C]` holding raw pixel values (0..255) and a PRNG key
and returns the transformed image; `attn_jax.preprocess` vmaps them over the batch. Geometric
transforms come from dm-pix; the Keras-layer equivalents they reproduce are named in each docstring.
"""

import dm_pix as pix
import jax


def random_crop(image: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """A `size` x `size` window at a uniformly random offset (keras RandomCrop): [H, W, C] -> [s, s, C]."""
    return pix.random_crop(key, image, (size, size, image.shape[-1]))


def random_flip(image: jax.Array, key: jax.Array) -> jax.Array:
    """Mirror left-right with probability 1/2 (keras RandomFlip("horizontal")): [H, W, C] -> same."""
    return pix.random_flip_left_right(key, image)
