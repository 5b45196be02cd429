"""The EANet paper's two attentions, computed faster on CPU than their reference forms.

- `ExternalAttention` computes `models.eanet.ExternalAttention` (same parameters) with the linear
  maps on either side of the double normalisation composed where that saves multiply-adds
  (`fold_memories`) and a few examples at a time (`chunking.py`: the softmax over tokens then reads
  each example's weights from cache).
- `chunked_dot_product_attention` is `nn.dot_product_attention` (as `nn.MultiHeadDotProductAttention`
  calls it: its `attention_fn`) a few examples at a time, in a heads-first layout, so the
  [heads, N, N] weights of each chunk stay in cache. Its scores come from `query_key_scores`,
  q k^T with the key's gradient computed as (q^T g)^T, which XLA:CPU runs in its fast dot
  library where autodiff's g^T q runs in its generic one
  (docs/performance.md#the-keys-gradient-of-the-attention-scores).

Both draw their dropout mask for the whole batch, from the same random key and of the same shape as
the reference layer, before splitting it: the chunking does not change it, and the fast layer drops
exactly what the reference one drops. Both take their softmax from `softmax`, whose backward pass
reuses the forward's log-sum-exp instead of recomputing the max and the sum, so it rebuilds the
weights in one pass (docs/performance.md#the-softmaxs-log-sum-exp-kept-for-the-backward-pass).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.fast.chunking import keep_for_backward, map_in_chunks, num_chunks
from attn_jax.models import eanet
from attn_jax.models.keras_init import glorot


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_given(logits: jax.Array, log_sum_exp: jax.Array, axis: int) -> jax.Array:
    """`jax.nn.softmax(logits, axis)` from its log-sum-exp over `axis` (a constant, the same shape
    with `axis` of size 1): one pass, exp(logits - log_sum_exp), no max or sum. Same shape."""
    return jnp.exp(logits - log_sum_exp)


def _softmax_given_forward(logits, log_sum_exp, axis):
    return _softmax_given(logits, log_sum_exp, axis), (logits, log_sum_exp)


def _softmax_given_backward(axis, residuals, weights_grad):
    """The softmax's gradient, dx = p * (dp - sum(dp * p)), with p recomputed in one pass. The
    log-sum-exp is a constant: its own dependence on the logits is in this formula already."""
    logits, log_sum_exp = residuals
    weights = jnp.exp(logits - log_sum_exp)
    dot = jnp.sum(weights_grad * weights, axis=axis, keepdims=True)
    return weights * (weights_grad - dot), jnp.zeros_like(log_sum_exp)


_softmax_given.defvjp(_softmax_given_forward, _softmax_given_backward)


def softmax(logits: jax.Array, axis: int) -> jax.Array:
    """`jax.nn.softmax(logits, axis)`, whose backward pass in `map_in_chunks` recomputes the weights
    in one pass from the forward's log-sum-exp, as FlashAttention's backward does, instead of
    repeating the max and the sum over the [.., N, N] scores: the log-sum-exp (1/N of the weights'
    size) is kept (`keep_for_backward`). Computed in float32, returned in the logits' dtype. Same
    shape."""
    dtype = logits.dtype
    logits = logits.astype(jnp.float32)
    log_sum_exp = jax.nn.logsumexp(logits, axis=axis, keepdims=True)
    # A constant to the gradient: its dependence on the logits is in `_softmax_given_backward`.
    log_sum_exp = keep_for_backward(jax.lax.stop_gradient(log_sum_exp))
    return _softmax_given(logits, log_sum_exp, axis).astype(dtype)


def double_normalize(logits: jax.Array, token_axis: int) -> jax.Array:
    """`models.eanet.double_normalize` (softmax over the tokens, then L1 over the slots, the last
    axis) with the softmax of `softmax`: [..., N, ..., S] -> float32, same shape."""
    return eanet.l1_over_slots(softmax(logits.astype(jnp.float32), token_axis))


class DenseParams(nn.Module):
    """An `nn.Dense` layer's variables, created but not applied: () -> (kernel [in, out], bias [out]),
    with the same names, shapes and initial values (Glorot-uniform kernel, zero bias)."""

    in_features: int
    out_features: int

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", glorot, (self.in_features, self.out_features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.out_features,), jnp.float32)
        return kernel, bias


def fold_memories(dim: int, heads: int, head_dim: int, memory_slots: int) -> bool:
    """Whether folding the memories into the outer Dense layers saves multiply-adds.

    Per token, the reference order costs dim*inner (expand) + inner*S (M_k, all heads) + inner*S
    (M_v) + inner*dim (out), with inner = heads * head_dim; the folded maps cost dim*heads*S twice.
    For the tutorial (dim 64, 16 heads of 16, S = 16) folding costs 32,768 instead of 40,960 and
    replaces the 16-wide memory matmuls, slow on CPU, by 256-wide ones; for the paper's S = 64 it
    would cost 131,072 instead of 65,536, so the memories are then applied as in the reference.
    """
    inner = heads * head_dim
    return dim * heads * memory_slots <= dim * inner + inner * memory_slots


def drop(weights: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """`nn.Dropout` with a given keep mask (None: nothing dropped). Same shape."""
    if keep is None:
        return weights
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


class ExternalAttention(eanet.ExternalAttention):
    """`models.eanet.ExternalAttention` (its fields), folded and chunked: [B, N, dim] -> [B, N, dim].

    Folded (when `fold_memories` says it is cheaper): expand then M_k become one [dim, heads * S]
    kernel, M_v then out one [heads * S, dim] kernel; the same function of the same parameters.
    """

    @nn.compact
    def __call__(self, x, *, train: bool):
        batch, tokens, dim = x.shape
        heads = self.num_heads * self.dim_coefficient
        inner = dim * self.dim_coefficient
        head_dim, slots = inner // heads, self.memory_slots
        w_e, b_e = DenseParams(dim, inner, name="expand")()
        w_k, b_k = DenseParams(head_dim, slots, name="memory_key")()
        w_v, b_v = DenseParams(slots, head_dim, name="memory_value")()
        w_o, b_o = DenseParams(inner, dim, name="out")()

        def dense(inputs, kernel, bias):
            return inputs.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)

        if fold_memories(dim, heads, head_dim, slots):
            # (x W_e + b_e) W_k + b_k = x (W_e W_k) + (b_e W_k + b_k), per head
            key_kernel = jnp.einsum("chd,ds->chs", w_e.reshape(dim, heads, head_dim), w_k)
            key_bias = b_e.reshape(heads, head_dim) @ w_k + b_k
            # merge(a W_v + b_v) W_o + b_o = a (W_v W_o per head) + (b_v sum_h W_o_h + b_o)
            w_o_heads = w_o.reshape(heads, head_dim, dim)
            value_kernel = jnp.einsum("sd,hdo->hso", w_v, w_o_heads)
            value_bias = b_v @ jnp.sum(w_o_heads, axis=0) + b_o

            def to_logits(x):  # [b, N, dim] -> [b, N, h, S]
                logits = dense(x, key_kernel.reshape(dim, -1), key_bias.reshape(-1))
                return logits.reshape(*x.shape[:2], heads, slots)

            def from_weights(attn):  # [b, N, h, S] -> [b, N, dim]
                merged = attn.reshape(*attn.shape[:2], heads * slots)
                return dense(merged, value_kernel.reshape(-1, dim), value_bias)
        else:
            def to_logits(x):
                queries = dense(x, w_e, b_e).reshape(*x.shape[:2], heads, head_dim)
                return dense(queries, w_k, b_k)

            def from_weights(attn):
                values = dense(attn, w_v, b_v)  # [b, N, h, head_dim]
                return dense(values.reshape(*attn.shape[:2], inner), w_o, b_o)  # merge heads

        def attention(x, keep):  # one chunk of examples: [b, N, dim] -> [b, N, dim]
            weights = double_normalize(to_logits(x), token_axis=1)
            return from_weights(drop(weights, keep, self.attention_dropout))

        keep = None
        if train and self.attention_dropout > 0:  # the reference's mask: same module, same key
            ones = jnp.ones((batch, tokens, heads, slots), jnp.float32)
            keep = nn.Dropout(self.attention_dropout, name="attention_dropout")(
                ones, deterministic=False) > 0
        y = map_in_chunks(attention, num_chunks(batch, tokens * heads * slots * 4), x, keep)
        return nn.Dropout(self.projection_dropout, name="projection_dropout")(
            y, deterministic=not train)


@jax.custom_vjp
def query_key_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q k^T per example and head: [..., N, d], [..., M, d] -> [..., N, M]; `jnp.matmul`'s values,
    with a backward pass laid out for XLA:CPU (`_query_key_scores_backward`)."""
    return q @ k.swapaxes(-1, -2)


def _query_key_scores_forward(q, k):
    return query_key_scores(q, k), (q, k)


def _query_key_scores_backward(residuals, scores_grad):
    """dq = g k, and dk = g^T q computed as (q^T g)^T: autodiff's form contracts the [N, M]
    gradient over its rows into a [M, d] result, which XLA:CPU hands to its slower generic dot;
    the same product with the small operand first runs in its fast library
    (docs/performance.md#the-keys-gradient-of-the-attention-scores). Same values."""
    q, k = residuals
    key_grad_t = jnp.einsum("...nd,...nm->...dm", q, scores_grad)  # [..., d, M]
    return scores_grad @ k, key_grad_t.swapaxes(-1, -2)


query_key_scores.defvjp(_query_key_scores_forward, _query_key_scores_backward)


def chunked_dot_product_attention(query, key, value, *, dropout_rng=None, dropout_rate=0.0,
                                  broadcast_dropout=True, deterministic=False, dtype=None,
                                  force_fp32_for_softmax=False):
    """`nn.dot_product_attention` a few examples at a time: q, k, v [B, N, h, d] -> [B, N, h, d].

    For `nn.MultiHeadDotProductAttention(attention_fn=...)`, which passes the keywords it accepts.
    No mask or bias (the ViT baseline has none); the dropout mask per example
    (`broadcast_dropout=False`) is drawn for the whole batch as the reference draws it.
    """
    if broadcast_dropout and not deterministic and dropout_rate > 0:
        raise ValueError("chunked_dot_product_attention draws a dropout mask per example: build "
                         "the attention with broadcast_dropout=False")
    dtype = dtype or query.dtype
    batch, queries, heads, _ = query.shape
    keys = key.shape[1]
    keep = None
    if not deterministic and dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (batch, heads, queries, keys))

    def attend(q, k, v, keep):  # one chunk, heads first: [b, N, h, d] -> [b, N, h, d]
        q, k, v = (t.astype(dtype).swapaxes(1, 2) for t in (q, k, v))  # [b, h, N, d]
        q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
        scores = query_key_scores(q, k)  # [b, h, N, N]
        # `softmax` computes in float32 and returns its input's dtype: float32 if forced, else dtype
        weights = softmax(scores.astype(jnp.float32) if force_fp32_for_softmax else scores, axis=-1)
        if keep is not None:
            multiplier = keep.astype(dtype) / jnp.asarray(1.0 - dropout_rate, dtype)
            weights = weights * multiplier
        return (weights @ v.astype(weights.dtype)).swapaxes(1, 2)  # [b, N, h, d]

    return map_in_chunks(attend, num_chunks(batch, heads * queries * keys * 4),
                         query, key, value, keep)
