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


# ---------------------------------------------------------------------------------------------
# RandAugment as timm's `rand-mM-mstdS-inc1` (DeiT's `rand-m9-mstd0.5-inc1`), after timm's
# `timm/data/auto_augment.py` (huggingface/pytorch-image-models): `_RAND_INCREASING_TRANSFORMS`,
# their `*_level_to_arg` magnitude mappings, `AugmentOp` (probability 0.5, magnitude noise) and
# `RandAugment` (ops drawn uniformly, with replacement). timm runs the ops on uint8 PIL images; here
# each op is the PIL operation's formula on one float image of raw pixel values [H, W, C] (0..255),
# written out because dm-pix's photometric ops are TensorFlow's (additive brightness, contrast about
# each channel's mean), not PIL's. Differences from timm, each deliberate:
# - values stay float between ops (PIL rounds to uint8 after each): at most ~1 level apart;
# - geometric ops interpolate bilinearly (DeiT asks timm for bicubic; timm's default picks bilinear
#   or bicubic at random), with PIL's sampling (pixel centres at +0.5, edges clamped, samples that
#   fall outside the image take the fill);
# - the fill is timm's default grey 128 (DeiT passes ImageNet's mean, (124, 116, 104));
# - Equalize, Posterize and Solarize read each pixel's value floored to an integer as PIL's uint8.
# ---------------------------------------------------------------------------------------------
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes run over [0, 10]
OP_PROBABILITY = 0.5  # timm's rand_augment_ops: each drawn op is applied with probability 0.5
FILL = 128.0  # timm's _FILL: the grey that geometric ops bring in from outside the image
TRANSLATE_FRACTION = 0.45  # timm's translate_pct default: TranslateXRel/YRel at magnitude 10
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's RGB -> "L" (ITU-R 601-2 luma)


def _gray(image: jax.Array) -> jax.Array:
    """PIL's "L" conversion of an RGB image: [H, W, 3] -> [H, W, 1]."""
    return (image @ jnp.asarray(GRAY_WEIGHTS, image.dtype))[..., None]


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ImageEnhance: Image.blend(degenerate, image, factor), clipped to [0, 255]."""
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _levels(image: jax.Array) -> jax.Array:
    """Each pixel's uint8 level as PIL would hold it, int32, same shape."""
    return jnp.clip(jnp.floor(image), 0, 255).astype(jnp.int32)


def auto_contrast(image: jax.Array) -> jax.Array:
    """PIL ImageOps.autocontrast (cutoff 0): each channel stretched from [min, max] to [0, 255];
    a flat channel is left as it is. [H, W, C] -> same."""
    low = jnp.min(image, axis=(0, 1), keepdims=True)
    high = jnp.max(image, axis=(0, 1), keepdims=True)
    flat = high <= low
    scale = 255.0 / jnp.where(flat, 1.0, high - low)
    return jnp.where(flat, image, jnp.clip((image - low) * scale, 0.0, 255.0))


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """PIL ImageOps.equalize of one channel [H, W]: the lookup table n // step, n the running
    histogram count offset by step // 2, step = (pixels - count of the highest level) // 255."""
    levels = _levels(channel)
    histogram = jnp.bincount(levels.ravel(), length=256)
    highest = 255 - jnp.argmax(histogram[::-1] > 0)
    step = (levels.size - histogram[highest]) // 255
    below = jnp.cumsum(histogram) - histogram  # pixels at lower levels
    table = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
    return jnp.where(step > 0, table[levels].astype(channel.dtype), channel)


def equalize(image: jax.Array) -> jax.Array:
    """PIL ImageOps.equalize, per channel: [H, W, C] -> same (a channel of one level is kept)."""
    return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(image)


def invert(image: jax.Array) -> jax.Array:
    """PIL ImageOps.invert: 255 - x. [H, W, C] -> same."""
    return 255.0 - image


def posterize(image: jax.Array, bits: jax.Array) -> jax.Array:
    """PIL ImageOps.posterize: keep the `bits` most significant bits of each level (0 bits: black).
    [H, W, C] -> same."""
    quantum = 2.0 ** (8 - bits)
    return jnp.floor(_levels(image) / quantum) * quantum


def solarize(image: jax.Array, threshold: jax.Array) -> jax.Array:
    """PIL ImageOps.solarize: levels at or above `threshold` inverted (256: none). [H, W, C] -> same."""
    return jnp.where(_levels(image) >= threshold, 255.0 - image, image)


def solarize_add(image: jax.Array, add: jax.Array, threshold: float = 128) -> jax.Array:
    """timm's solarize_add: `add` added to levels below `threshold`, clipped at 255. [H, W, C] -> same."""
    return jnp.where(_levels(image) < threshold, jnp.minimum(image + add, 255.0), image)


def color(image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance.Color: blend of the grey image and the image (1: unchanged). [H, W, 3]."""
    return _blend(_gray(image), image, factor)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance.Contrast: blend of the grey image's mean level (rounded) and the image.
    [H, W, 3] -> same."""
    mean = jnp.floor(jnp.mean(_gray(image)) + 0.5)
    return _blend(mean, image, factor)


def brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance.Brightness: blend of black and the image, x * factor. [H, W, C] -> same."""
    return _blend(jnp.zeros_like(image), image, factor)


def _smooth(image: jax.Array) -> jax.Array:
    """PIL ImageFilter.SMOOTH: 3x3 kernel [[1 1 1] [1 5 1] [1 1 1]] / 13 inside, border pixels
    copied. [H, W, C] -> same."""
    kernel = jnp.ones((3, 3), image.dtype).at[1, 1].set(5.0) / 13.0
    inner = jax.vmap(lambda c: jax.scipy.signal.convolve2d(c, kernel, mode="valid"),
                     in_axes=-1, out_axes=-1)(image)
    return image.at[1:-1, 1:-1].set(inner)


def sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance.Sharpness: blend of the smoothed image and the image. [H, W, C] -> same."""
    return _blend(_smooth(image), image, factor)


def pil_affine(image: jax.Array, matrix: tuple, fill: float = FILL) -> jax.Array:
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f)) with bilinear sampling: [H, W, C] -> same.

    Output pixel (x, y) reads the input at (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5 and
    y' = y + 0.5 (PIL's pixel centres); a point outside [0, W) x [0, H) takes `fill`, one inside is
    interpolated with the edges clamped. The identity matrix gives exactly the input.
    """
    a, b, c, d, e, f = matrix
    height, width = image.shape[:2]
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                              jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
    x_in, y_in = a * cols + b * rows + c, d * cols + e * rows + f
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)

    def one_channel(channel):
        return jax.scipy.ndimage.map_coordinates(channel, [y_in - 0.5, x_in - 0.5], order=1,
                                                 mode="nearest")

    sampled = jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image)
    return jnp.where(inside[..., None], sampled, fill)


def pil_rotate(image: jax.Array, degrees: jax.Array, fill: float = FILL) -> jax.Array:
    """PIL Image.rotate(degrees) about the image centre (counter-clockwise for degrees > 0), bilinear,
    `fill` outside. [H, W, C] -> same."""
    angle = -jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = image.shape[1] / 2.0, image.shape[0] / 2.0
    return pil_affine(image, (cos, sin, cx - cos * cx - sin * cy,
                              -sin, cos, cy + sin * cx - cos * cy), fill)


def _enhance_factor(level, sign):
    """timm's _enhance_increasing_level_to_arg: 1 -+ level / 10 * 0.9, at least 0.1."""
    return jnp.maximum(0.1, 1.0 + sign * level / LEVEL_DENOM * 0.9)


def _shear(level, sign):
    """timm's _shear_level_to_arg: up to +-0.3."""
    return sign * level / LEVEL_DENOM * 0.3


def _translate(level, sign, size):
    """timm's _translate_rel_level_to_arg times the image side: up to +-0.45 of it, in pixels."""
    return sign * level / LEVEL_DENOM * TRANSLATE_FRACTION * size


# timm's _RAND_INCREASING_TRANSFORMS in timm's order; each op maps (image, level in [0, 10], sign
# +-1 for timm's _randomly_negate) to the image, with timm's LEVEL_TO_ARG mapping.
RAND_INCREASING_OPS = {
    "AutoContrast": lambda x, level, sign: auto_contrast(x),
    "Equalize": lambda x, level, sign: equalize(x),
    "Invert": lambda x, level, sign: invert(x),
    "Rotate": lambda x, level, sign: pil_rotate(x, sign * level / LEVEL_DENOM * 30.0),
    "PosterizeIncreasing": lambda x, level, sign: posterize(
        x, 4 - jnp.floor(level / LEVEL_DENOM * 4)),
    "SolarizeIncreasing": lambda x, level, sign: solarize(
        x, 256 - jnp.floor(level / LEVEL_DENOM * 256)),
    "SolarizeAdd": lambda x, level, sign: solarize_add(x, jnp.floor(level / LEVEL_DENOM * 110)),
    "ColorIncreasing": lambda x, level, sign: color(x, _enhance_factor(level, sign)),
    "ContrastIncreasing": lambda x, level, sign: contrast(x, _enhance_factor(level, sign)),
    "BrightnessIncreasing": lambda x, level, sign: brightness(x, _enhance_factor(level, sign)),
    "SharpnessIncreasing": lambda x, level, sign: sharpness(x, _enhance_factor(level, sign)),
    "ShearX": lambda x, level, sign: pil_affine(x, (1.0, _shear(level, sign), 0.0, 0.0, 1.0, 0.0)),
    "ShearY": lambda x, level, sign: pil_affine(x, (1.0, 0.0, 0.0, _shear(level, sign), 1.0, 0.0)),
    "TranslateXRel": lambda x, level, sign: pil_affine(
        x, (1.0, 0.0, _translate(level, sign, x.shape[1]), 0.0, 1.0, 0.0)),
    "TranslateYRel": lambda x, level, sign: pil_affine(
        x, (1.0, 0.0, 0.0, 0.0, 1.0, _translate(level, sign, x.shape[0]))),
}


def rand_augment_op(image: jax.Array, index: jax.Array, level: jax.Array,
                    sign: jax.Array) -> jax.Array:
    """Op number `index` of RAND_INCREASING_OPS at magnitude `level`: [H, W, 3] -> same."""
    branches = [lambda x, lv, s, op=op: op(x, lv, s).astype(x.dtype)
                for op in RAND_INCREASING_OPS.values()]
    return jax.lax.switch(index, branches, image, level, sign)


def _rand_augment_layer(image: jax.Array, key: jax.Array, magnitude: float,
                        magnitude_std: float) -> jax.Array:
    """One of timm's RandAugment layers: an op drawn uniformly, applied with probability 0.5 at a
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10], its sign +-1 at random."""
    op_key, apply_key, noise_key, sign_key = jax.random.split(key, 4)
    index = jax.random.randint(op_key, (), 0, len(RAND_INCREASING_OPS))
    level = magnitude + magnitude_std * jax.random.normal(noise_key)
    level = jnp.clip(level, 0.0, LEVEL_DENOM)
    sign = jnp.where(jax.random.bernoulli(sign_key), -1.0, 1.0)
    changed = rand_augment_op(image, index, level, sign)
    return jnp.where(jax.random.bernoulli(apply_key, OP_PROBABILITY), changed, image)


def rand_augment(image: jax.Array, key: jax.Array, num_ops: int, magnitude: float,
                 magnitude_std: float) -> jax.Array:
    """timm's RandAugment over RAND_INCREASING_OPS: `num_ops` layers on one raw-pixel RGB image.

    rand-m9-mstd0.5-inc1 is num_ops=2, magnitude=9, magnitude_std=0.5. [H, W, 3] -> same; num_ops 0
    returns the image itself.
    """
    for layer_key in jax.random.split(key, num_ops) if num_ops else ():
        image = _rand_augment_layer(image, layer_key, magnitude, magnitude_std)
    return image


# ---------------------------------------------------------------------------------------------
# Random erasing as timm's RandomErasing(mode="pixel", max_count=1) (timm/data/random_erasing.py),
# on one normalised image, as timm applies it after normalisation.
# ---------------------------------------------------------------------------------------------
ERASE_ATTEMPTS = 10  # timm's RandomErasing: boxes drawn until one fits, at most 10 times


def erase_box(key: jax.Array, height: int, width: int, area: tuple[float, float],
              aspect: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
    """timm's box draw: target area uniform in `area` (a fraction of the image), log aspect ratio
    uniform in log(`aspect`), h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)); the first
    of 10 draws with h < height and w < width, at a uniform position.

    Returns the box mask [height, width] bool (all False when no draw fits) and whether one fit.
    """
    area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
    target = jax.random.uniform(area_key, (ERASE_ATTEMPTS,), minval=area[0],
                                maxval=area[1]) * height * width
    ratio = jnp.exp(jax.random.uniform(aspect_key, (ERASE_ATTEMPTS,), minval=jnp.log(aspect[0]),
                                       maxval=jnp.log(aspect[1])))
    h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits)
    h, w = h[first], w[first]
    top = jax.random.randint(top_key, (), 0, height - h + 1)
    left = jax.random.randint(left_key, (), 0, width - w + 1)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return box & fits[first], fits[first]


def random_erase(image: jax.Array, key: jax.Array, probability: float,
                 area: tuple[float, float], aspect: tuple[float, float]) -> jax.Array:
    """With `probability`, one box of the normalised image [H, W, C] replaced by N(0, 1) noise per
    pixel and channel (timm's mode "pixel"); [H, W, C] -> same."""
    apply_key, box_key, noise_key = jax.random.split(key, 3)
    box, _ = erase_box(box_key, image.shape[0], image.shape[1], area, aspect)
    box = box & jax.random.bernoulli(apply_key, probability)
    noise = jax.random.normal(noise_key, image.shape, image.dtype)
    return jnp.where(box[..., None], noise, image)
