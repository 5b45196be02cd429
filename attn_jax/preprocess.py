"""Device-side preprocessing: uint8 batches -> model inputs, inside the jitted steps.

One fixed order serves both tutorials, each step switched on by its config value:

    raw pixels (float, 0..255) -> resize -> [train] random crop -> flip -> rotation -> contrast
    -> zoom -> normalise ("rescale": x / 255, or "standardize": (x - mean) / std per channel)

Normalisation comes last and is the same in training and evaluation: the EANet tutorial normalised
first and clipped in RandomContrast during training only, which broke its evaluation.
Random steps draw one key per example, so the output does not depend on how the batch is sharded.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from attn_jax import augment


def _resize(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] to [B, size, size, C] (keras Resizing, no antialiasing)."""
    if images.shape[1:3] == (size, size):
        return images
    shape = (images.shape[0], size, size, images.shape[-1])
    return jax.image.resize(images, shape, method="bilinear", antialias=False)


def _augment_one(image: jax.Array, key: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """The random steps for one [H, W, C] image, in the tutorials' order."""
    crop_key, flip_key, rotate_key, contrast_key, zoom_key = jax.random.split(key, 5)
    if cfg.crop:
        image = augment.random_crop(image, crop_key, cfg.crop)
    if cfg.flip:
        image = augment.random_flip(image, flip_key)
    if cfg.rotation:
        image = augment.random_rotation(image, rotate_key, cfg.rotation)
    if cfg.contrast:
        image = augment.random_contrast(image, contrast_key, cfg.contrast)
    if cfg.zoom:
        image = augment.random_zoom(image, zoom_key, cfg.zoom, cfg.zoom)
    return image


def normalize(images: jax.Array, cfg: ml_collections.ConfigDict,
              stats: dict[str, jax.Array] | None) -> jax.Array:
    """Raw pixel values -> model inputs, by `cfg.normalize`: "rescale" or "standardize"."""
    if cfg.normalize == "rescale":
        return images / 255.0
    if cfg.normalize == "standardize":
        return (images - stats["mean"]) / stats["std"]
    raise ValueError(f"unknown config.preprocess.normalize {cfg.normalize!r}")


def for_eval(images: jax.Array, cfg: ml_collections.ConfigDict,
             stats: dict[str, jax.Array] | None = None) -> jax.Array:
    """Deterministic preprocessing: uint8 [B, H, W, C] -> float32 [B, size, size, C]."""
    return normalize(_resize(images.astype(jnp.float32), cfg.size), cfg, stats)


def for_train(images: jax.Array, key: jax.Array, cfg: ml_collections.ConfigDict,
              stats: dict[str, jax.Array] | None = None) -> jax.Array:
    """Random training preprocessing: uint8 [B, H, W, C] -> float32 [B, size, size, C].

    With `cfg.crop`, images are first resized to `cfg.train_resize` and cropped back to `cfg.crop`
    (which must equal `cfg.size`); without it they are resized to `cfg.size` as in evaluation.
    """
    size = cfg.train_resize if cfg.crop else cfg.size
    images = _resize(images.astype(jnp.float32), size)
    keys = jax.random.split(key, images.shape[0])
    images = jax.vmap(functools.partial(_augment_one, cfg=cfg))(images, keys)
    return normalize(images, cfg, stats)
