"""A trained model's predictions on images: class probabilities and the class token's attention map.

Used during training for the attention grid of each epoch (`train._end_epoch` predicts on
`fixed_images`, `attention_maps.render_epoch_grid` draws) and by `--mode=attend` on any image
(`modes.attend`).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from attn_jax import preprocess, registry
from attn_jax.errors import UserError


@functools.partial(jax.jit, static_argnames=("model", "preprocess_cfg"))
def _predict(params, images, stats, *, model, preprocess_cfg):
    inputs = preprocess.for_eval(images, preprocess_cfg, stats)
    logits, attention = model.apply({"params": params}, inputs, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), attention


def _local(tree):
    """This process's first copy of each (replicated) array: computing on it needs no other device
    or process."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def predict(model, params, images: np.ndarray, preprocess_cfg: ml_collections.ConfigDict,
            stats=None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [n, H, W, 3] -> (class probabilities [n, C], attention [n, N] or None), with
    evaluation's preprocessing (`preprocess.for_eval`). Jitted, on one device of this process (the
    params and stats are replicated: their local copy is used); compiled once per model and shape."""
    frozen = ml_collections.FrozenConfigDict(preprocess_cfg)
    probs, attention = _predict(_local(params), jnp.asarray(images, jnp.uint8), _local(stats),
                                model=model, preprocess_cfg=frozen)
    return np.asarray(probs), None if attention is None else np.asarray(attention, np.float32)


def has_attention_map(config: ml_collections.ConfigDict) -> bool:
    """Whether config's model returns an attention map, found abstractly (no weights, no data)."""
    model = registry.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    (_, attention), _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                                       jax.random.key(0), images)
    return attention is not None


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] of any size -> uint8 [size[0], size[1], 3], the dataset's image size, as the
    tutorial resizes an arbitrary image before its evaluation preprocessing (bilinear; PIL filters
    over the whole footprint when shrinking, so a large photo does not alias)."""
    if image.shape[:2] == tuple(size):
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def fixed_images(split, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n examples of `split` (a `data.Split`) in its stored order, (uint8 images, int
    labels): the same every time it is called."""
    images, labels = split.examples.read(np.arange(min(n, split.num_examples)))
    if not len(labels):
        raise UserError("the validation split is empty: no images to draw attention maps on")
    return images, labels
