"""Device-side preprocessing: uint8 batches -> model inputs, inside the jitted steps.

One fixed order serves both tutorials, each step switched on by its config value:

    raw pixels (float, 0..255) -> resize -> [train] random crop -> flip -> rotation -> contrast
    -> zoom -> RandAugment -> normalise ("rescale": x / 255, or "standardize": (x - mean) / std per
    channel) -> [train] random erasing

RandAugment and random erasing are timm's (DeiT's recipe; `augment.rand_augment`,
`augment.random_erase`), erasing after normalisation as timm does; Mixup and CutMix, batch-wise,
follow in the train step (`attn_jax.mixing`).

Normalisation comes last and is the same in training and evaluation: the EANet tutorial normalised
first and clipped in RandomContrast during training only, which broke its evaluation.
Random steps draw one key per example, so the output does not depend on how the batch is sharded.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # timm.data.constants
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images: jax.Array, cfg: ml_collections.ConfigDict,
              stats: dict[str, jax.Array] | None) -> jax.Array:
    """Raw pixel values -> model inputs, by `cfg.normalize`: "rescale" (x / 255), "standardize"
    (the training split's per-channel mean and std) or "imagenet" (x / 255 standardised by
    ImageNet's mean and std, timm's IMAGENET_DEFAULT_MEAN / STD, as DeiT and the official
    PatchConvNet weights expect)."""
    if cfg.normalize == "rescale":
        return images / 255.0
    if cfg.normalize == "imagenet":
        return (images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return (images - stats["mean"]) / stats["std"]  # "standardize"


def for_eval(images: jax.Array, cfg: ml_collections.ConfigDict,
             stats: dict[str, jax.Array] | None = None) -> jax.Array:
    """Deterministic preprocessing: uint8 [B, H, W, C] -> float32 [B, size, size, C]."""
    return normalize(_resize(images.astype(jnp.float32), cfg.size), cfg, stats)


def _rand_augment_on(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.randaugment_ops > 0


def _erasing_on(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.erase_prob > 0


def _rand_augment_one(image: jax.Array, key: jax.Array,
                      cfg: ml_collections.ConfigDict) -> jax.Array:
    """RandAugment (config.preprocess.randaugment_*) of one raw-pixel image: [H, W, C] -> same."""
    return augment.rand_augment(image, key, cfg.randaugment_ops, cfg.randaugment_magnitude,
                                cfg.randaugment_magnitude_std)


def _erase_one(image: jax.Array, key: jax.Array, cfg: ml_collections.ConfigDict) -> jax.Array:
    """Random erasing (config.preprocess.erase_*) of one normalised image: [H, W, C] -> same."""
    return augment.random_erase(image, key, cfg.erase_prob, tuple(cfg.erase_area),
                                tuple(cfg.erase_aspect))


def for_train(images: jax.Array, key: jax.Array, cfg: ml_collections.ConfigDict,
              stats: dict[str, jax.Array] | None = None) -> jax.Array:
    """Random training preprocessing: uint8 [B, H, W, C] -> float32 [B, size, size, C].

    With `cfg.crop`, images are first resized to `cfg.train_resize` and cropped back to `cfg.crop`
    (which must equal `cfg.size`); without it they are resized to `cfg.size` as in evaluation.
    Each example's key is split once more for RandAugment and random erasing only when one of them
    is on, so the tutorials' steps draw exactly what they drew before those existed.
    """
    size = cfg.train_resize if cfg.crop else cfg.size
    images = _resize(images.astype(jnp.float32), size)
    keys = jax.random.split(key, images.shape[0])
    if _rand_augment_on(cfg) or _erasing_on(cfg):
        split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # [B, 3]
        keys, rand_augment_keys, erase_keys = split[:, 0], split[:, 1], split[:, 2]
    images = jax.vmap(functools.partial(_augment_one, cfg=cfg))(images, keys)
    if _rand_augment_on(cfg):
        images = jax.vmap(functools.partial(_rand_augment_one, cfg=cfg))(images, rand_augment_keys)
    images = normalize(images, cfg, stats)
    if _erasing_on(cfg):
        images = jax.vmap(functools.partial(_erase_one, cfg=cfg))(images, erase_keys)
    return images
