"""The tutorial PatchConvNet's class attention with its key and value projections folded into its
one query: `folded_class_attention`, for `models.patch_convnet_tutorial.reference_class_attention`.

With the class token as the only query, the keys and values of all N + 1 tokens are needed only
through two sums, so the projections can act on those sums instead of on every token
(x [B, N + 1, d_in]; q [B, d]; W_k, W_v [d_in, d]; b_k, b_v [d]; w the weights after dropout):

    scores_j  = q . (x_j W_k + b_k)        = x_j . (W_k q) + q . b_k
    attended  = sum_j w_j (x_j W_v + b_v)  = (sum_j w_j x_j) W_v + (sum_j w_j) b_v

q . b_k is the same for every token, and the softmax over tokens does not change when a constant is
added to all its scores, so it is left out: the key's bias then gets no gradient (the reference's
is rounding noise around zero).

The reference computes the key and value projections of every token: two [B (N + 1), d_in] x
[d_in, d] matmuls forward and four backward, 13% of the tutorial PatchConvNet's matmul FLOPs at
N + 1 = 145. Folded, each is a product with one vector per example
(docs/performance.md#the-tutorial-patchconvnets-pooling-gelu-and-winograd-on-zen-5). The same
function in exact arithmetic, with the same parameters (the projections' kernels and biases are
read, not recomputed), the same weights and the same dropout mask; only the order of the sums
differs (`tests/test_fast_equivalence.py`).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _kernel_and_bias(projection: nn.Module, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A DenseGeneral's kernel [d_in, heads, d] and bias [heads, d] (one with a bias, over the last
    axis, as the pooling's are), in its compute dtype (`projection.dtype`, set by the pooling). At
    initialisation it is applied once, to one token, so that its parameters exist."""
    if projection.is_initializing():
        projection(x[:, :1])
    params = projection.variables["params"]
    return (params["kernel"].astype(projection.dtype or x.dtype),
            params["bias"].astype(projection.dtype or x.dtype))


def folded_class_attention(x: jax.Array, query: nn.Module, key: nn.Module, value: nn.Module,
                           dropout: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """x = [cls; patches] [B, N + 1, d_in] -> (attended [B, 1, heads, d], weights
    [B, heads, 1, N + 1]), as `patch_convnet_tutorial.reference_class_attention` computes them."""
    q = query(x[:, :1])  # [B, 1, heads, d]
    w_k, _ = _kernel_and_bias(key, x)  # q . b_k: the same for every token, no effect (above)
    w_v, b_v = _kernel_and_bias(value, x)
    x = x.astype(q.dtype)
    q_k = jnp.einsum("bqhd,chd->bqhc", q, w_k)  # W_k q: [B, 1, heads, d_in]
    scores = jnp.einsum("bqhc,bkc->bhqk", q_k, x) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, heads, 1, N + 1]
    dropped = dropout(weights)
    mass = jnp.einsum("bhqk->bqh", dropped).astype(q.dtype)  # sum_j w_j (1 without dropout), summed
    # in float32 as the reference's dot accumulates it: [B, 1, heads]
    pooled = jnp.einsum("bhqk,bkc->bqhc", dropped.astype(q.dtype), x)  # sum_j w_j x_j: [B, 1, h, d_in]
    attended = jnp.einsum("bqhc,chd->bqhd", pooled, w_v) + mass[..., None] * b_v
    return attended, weights
