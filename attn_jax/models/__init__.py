"""The attn_jax classifiers, by name: `MODELS` and `model_names()`.

Every model is a `flax.linen.Module` called as `model(images, train=bool)` on float images of shape
`[batch, height, width, 3]` (already preprocessed) and returning `(logits, attention)`: logits of
shape `[batch, num_classes]`, and the class token's attention weights over the patches of shape
`[batch, num_patches]` (softmax weights, summing to 1) or `None` for models without one.

The models here are the reference forms, plain Flax layers in the papers' vocabulary. Each takes
the layers it is built from as fields (`conv`, `gelu`, `class_attention`, `external_attention`,
`attention_fn`), as flax's ResNet takes `conv`; `attn_jax.registry` builds a model from a config and
chooses those layers. A bad field value is a `ValueError` (or, for an unknown field, a `TypeError`)
here; the registry turns it into the user's one-line error. This package needs only flax, jax and
numpy.
"""

from collections.abc import Callable

import flax.linen as nn

from attn_jax.models import eanet, patch_convnet, patch_convnet_tutorial

MODELS: dict[str, Callable[..., nn.Module]] = {
    "eanet": eanet.EANet,
    "patch_convnet_tutorial": patch_convnet_tutorial.PatchConvNetTutorial,
    "patch_convnet": patch_convnet.PatchConvNet,
    **patch_convnet.VARIANTS,
}


def model_names() -> list[str]:
    """The names of `MODELS`, sorted."""
    return sorted(MODELS)
