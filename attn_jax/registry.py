"""A model from its config: `create_model(config, num_classes)` builds any attn_jax classifier.

The models (`attn_jax.models`, by name in `models.MODELS`) are the reference forms; each takes the
layers it is built from as fields. `layers_for` is the ONE place that swaps in the speed versions of
`attn_jax.fast` (same parameters, same function: `tests/test_fast_equivalence.py`), from
`config.model.impl`. The config's values were checked by `validate.check`; a model that refuses
its fields is a one-line `UserError` naming them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from attn_jax import fast, models
from attn_jax.errors import UserError


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name` with constructor keyword arguments `kwargs`; a field
    the model refuses (its TypeError or ValueError) is a `UserError`."""
    if name not in models.MODELS:
        raise UserError(
            f"unknown model name {name!r}: set config.model.name to one of "
            f"{', '.join(models.model_names())}"
        )
    try:
        return models.MODELS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r} does not accept these config.model fields: {e}") from None
    except ValueError as e:  # its message names the config field to fix
        raise UserError(str(e)) from None


def resolve_impl(impl: str, backend: str) -> str:
    """config.model.impl -> "reference" or "fast". "auto" is "fast" where it was measured faster:
    on CPU (the folded and chunked attentions, the matmul conv gradient and Winograd's 3x3, the
    folded class attention, GELU through erf:
    docs/performance.md#the-fast-layers-and-the-cpu-settings); elsewhere "reference", whose
    whole-batch ops GPUs and TPUs run well."""
    if impl == "auto":
        return "fast" if backend == "cpu" else "reference"
    return impl


def layers_for(impl: str, backend: str | None = None) -> dict:
    """The layer fields a model is built with under config.model.impl on `backend` (default: JAX's
    default backend): {} for the reference layers (each model's defaults), else the fast ones."""
    if resolve_impl(impl, backend or jax.default_backend()) == "reference":
        return {}
    return {"conv": fast.Conv, "gelu": fast.gelu, "class_attention": fast.folded_class_attention,
            "external_attention": fast.ExternalAttention,
            "attention_fn": fast.chunked_dot_product_attention}


def compute_dtype(name: str) -> jnp.dtype:
    """config.dtype -> dtype: "auto" is bfloat16 on GPU/TPU and float32 on CPU."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 impl: str | None = None) -> nn.Module:
    """The model named by config.model.name, with the rest of config.model as its fields, built
    from the layers `impl` (default config.model.impl) chooses."""
    fields = {k: v for k, v in config.model.items() if k not in ("name", "impl")}
    entry = models.MODELS.get(config.model.name)
    model_class = getattr(entry, "func", entry)  # the variants are partials of PatchConvNet
    layers = {k: v for k, v in layers_for(impl or config.model.impl).items()
              if k in getattr(model_class, "__dataclass_fields__", {})}  # the layers it takes
    return get_model(config.model.name, num_classes=num_classes,
                     dtype=compute_dtype(config.dtype), **fields, **layers)
