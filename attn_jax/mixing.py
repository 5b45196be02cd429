"""Mixup and CutMix on the device, batch-wise, as timm's `Mixup` (timm/data/mixup.py) in its default
mode "batch": one mixing weight (and one CutMix box) for the whole global batch, each example mixed
with its partner in the batch reversed (`x.flip(0)`).

With probability `prob` the batch is mixed: CutMix with probability `switch_prob` when both alphas
are on (else whichever is on), its weight lam ~ Beta(alpha, alpha). Mixup blends the images,
lam x + (1 - lam) x[::-1]; CutMix pastes a box of the partner, of side sqrt(1 - lam) times the
image's, centred uniformly and clipped at the edges, and corrects lam to 1 - (the box's area) /
(the image's) as timm's `correct_lam`. The targets are lam onehot(y) + (1 - lam) onehot(y[::-1]).

Label smoothing: timm folds it into these targets (off = smoothing / classes); attn_jax passes the
mixed one-hot targets through the existing label-smoothed loss (`train.soft_cross_entropy`), which
gives the same targets because smoothing is linear. The partner is the reversed *global* batch, so
the result does not depend on the number of devices.
"""

import jax
import jax.numpy as jnp
import ml_collections


def enabled(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether config.mixup mixes anything (timm's mixup_active: an alpha above 0)."""
    return cfg is not None and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """timm's rand_bbox: a box of int(height * sqrt(1 - lam)) x int(width * sqrt(1 - lam)) centred on
    a uniform pixel, clipped at the edges: a bool mask [height, width]."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    y_key, x_key = jax.random.split(key)
    cy = jax.random.randint(y_key, (), 0, height)
    cx = jax.random.randint(x_key, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mixup(images: jax.Array, lam: jax.Array) -> jax.Array:
    """lam x + (1 - lam) x[::-1]: [B, H, W, C] -> same."""
    return lam * images + (1.0 - lam) * images[::-1]


def cutmix(images: jax.Array, box: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The partner's pixels inside `box` [H, W]: [B, H, W, C] -> same, and the corrected weight
    lam = 1 - box area / image area of the original image."""
    mixed = jnp.where(box[None, :, :, None], images[::-1], images)
    return mixed, 1.0 - jnp.mean(box.astype(jnp.float32))


def draw_lam(key: jax.Array, cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """timm's _params_per_batch: (lam, use_cutmix); lam is 1 (no mixing) with probability 1 - prob."""
    mix_key, switch_key, mixup_key, cutmix_key = jax.random.split(key, 4)
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(switch_key, cfg.switch_prob)
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
    mixup_lam = (jax.random.beta(mixup_key, cfg.mixup_alpha, cfg.mixup_alpha)
                 if cfg.mixup_alpha > 0 else jnp.float32(1))
    cutmix_lam = (jax.random.beta(cutmix_key, cfg.cutmix_alpha, cfg.cutmix_alpha)
                  if cfg.cutmix_alpha > 0 else jnp.float32(1))
    lam = jnp.where(use_cutmix, cutmix_lam, mixup_lam)
    lam = jnp.where(jax.random.bernoulli(mix_key, cfg.prob), lam, 1.0)
    return lam.astype(jnp.float32), use_cutmix


def mix_batch(images: jax.Array, labels: jax.Array, num_classes: int, key: jax.Array,
              cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixup or CutMix of a global batch: images [B, H, W, C], int labels [B] -> mixed images
    [B, H, W, C], target distributions [B, num_classes] (not smoothed) and the dominant label [B]
    (the one with the larger weight: the example's own when lam >= 0.5, else its partner's)."""
    lam_key, box_key = jax.random.split(key)
    lam, use_cutmix = draw_lam(lam_key, cfg)
    box = cutmix_box(box_key, images.shape[1], images.shape[2], lam)
    cut_images, cut_lam = cutmix(images, box)
    images = jnp.where(use_cutmix, cut_images, mixup(images, lam))
    lam = jnp.where(use_cutmix, cut_lam, lam)  # without mixing, lam = 1 and the box is empty
    onehot = jax.nn.one_hot(labels, num_classes)
    targets = lam * onehot + (1.0 - lam) * onehot[::-1]
    dominant = jnp.where(lam >= 0.5, labels, labels[::-1])
    return images, targets, dominant
