"""Model registry: `get_model(name, **kwargs)` builds any attn_jax classifier by name.

Every model is a `flax.linen.Module` called as `model(images, train=bool)` on float images of shape
`[batch, height, width, 3]` (already preprocessed) and returning `(logits, attention)`: logits of
shape `[batch, num_classes]`, and the class token's attention weights over the patches of shape
`[batch, num_patches]` (softmax weights, summing to 1) or `None` for models without one.
"""

from collections.abc import Callable

import flax.linen as nn

from attn_jax.errors import UserError
from attn_jax.models import eanet, patch_convnet, patch_convnet_tutorial

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "eanet": eanet.EANet,
    "patch_convnet_tutorial": patch_convnet_tutorial.PatchConvNetTutorial,
    "patch_convnet": patch_convnet.PatchConvNet,
    **patch_convnet.VARIANTS,
}


def model_names() -> list[str]:
    """The names `get_model` accepts, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name` with constructor keyword arguments `kwargs`."""
    if name not in _MODELS:
        raise UserError(
            f"unknown model name {name!r}: set config.model.name to one of {', '.join(model_names())}"
        )
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r} does not accept these config.model fields: {e}") from None
