"""Speed versions of the reference layers, for XLA:CPU, where each was measured faster
(docs/performance.md#the-fast-layers-and-the-cpu-settings).

Each has the parameters of the layer it replaces (same names, shapes and initial values) and
computes the same function, outputs and gradients, dropout included (`tests/test_fast_equivalence.py`);
only the order and the grouping of the arithmetic differ:

- `ExternalAttention` (for `models.eanet.ExternalAttention`): the memories folded into the outer
  Dense layers where that saves multiply-adds, and the attention computed a few examples at a time.
- `chunked_dot_product_attention` (for `nn.dot_product_attention`, the ViT baseline's
  `attention_fn`): the [heads, N, N] weights computed a few examples at a time, in cache.
  Both attentions' softmax (`attention.softmax`) keeps its log-sum-exp for the backward pass;
  the self-attention's scores (`attention.query_key_scores`) have a backward laid out for XLA:CPU.
- `Conv` (for `nn.Conv`): the kernel gradient as matrix multiplies, and a float32 SAME 3x3 of
  stride 1 (the tutorial PatchConvNet's trunk) in Winograd's F(4x4, 3x3), 4x fewer multiplies
  (`winograd.py`; its rounding differs more, about 3e-6 relative).
- `gelu` (for the tutorial PatchConvNet's exact GELU, `nn.gelu(approximate=False)`): through `erf`
  instead of `erfc`, cheaper on XLA:CPU (`activations.py`; differs by under 1e-6 in absolute value).
- `folded_class_attention` (for the tutorial PatchConvNet's `reference_class_attention`): its key and value
  projections folded into the one query, a product with one vector per example instead of a
  projection of every token (`class_attention.py`).
- `threefry.use_unrolled_threefry_on_cpu`: JAX's random-bit hash without its rolled loop on CPU,
  installed by `launch.py`, not on import.

The models take these as fields; `attn_jax.registry.layers_for` chooses them from `config.model.impl`
("auto": on CPU).
"""

from attn_jax.fast.activations import gelu
from attn_jax.fast.attention import ExternalAttention, chunked_dot_product_attention
from attn_jax.fast.class_attention import folded_class_attention
from attn_jax.fast.conv import Conv
from attn_jax.fast.threefry import use_unrolled_threefry_on_cpu

__all__ = ["Conv", "ExternalAttention", "chunked_dot_product_attention", "folded_class_attention",
           "gelu", "use_unrolled_threefry_on_cpu"]
