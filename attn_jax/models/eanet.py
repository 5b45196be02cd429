"""EANet (external attention) as built by the Keras tutorial "Image classification with EANet".

Guo et al., "Beyond self-attention: external attention using two linear layers for visual
recognition" (2021), in the form of the keras-io `eanet` example (CIFAR-100, 361,380 trainable
parameters), with the tutorial's ViT baseline (multi-head self-attention in place of external
attention, 623,268):

    image [B, H, W, 3]
      -> 2x2 patches, flattened in (row, col, channel) order             -> [B, N, p*p*3]
      -> Dense(dim) + learned position embedding [N, dim]                -> [B, N, dim]
      -> `num_blocks` x  x + Attn(LN(x)); x + MLP(LN(x))                 -> [B, N, dim]
      -> mean over tokens, Dense head                                    -> logits [B, classes]

External attention (per block): Dense(dim * coef), split into num_heads * coef heads, memory keys
M_k = Dense(S) shared across heads, softmax over the tokens, L1 over the S memory slots (the
"double normalisation"), dropout, memory values M_v = Dense(head_dim), merge heads, Dense(dim),
dropout. The tutorial has S = dim // dim_coefficient = 16; the paper uses S = 64 (`memory_slots`).

Initialisers follow Keras (Glorot-uniform kernels with Keras' fans, see `DenseParams`; zero biases,
uniform(-0.05, 0.05) position embedding). The MLP's GELU is a field, `gelu_approximate`: False (the
default) is exact (erf), as `tf.nn.gelu` in the TensorFlow 2 version of the tutorial, the run behind
the published 43.91%; True is the tanh approximation that the current Keras 3 text gets from
`ops.gelu` (whose default is `approximate=True`), a difference below 1e-3 per activation. The
tutorial's softmax head is left to the loss: the model returns logits.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.errors import UserError
from attn_jax.models.chunking import attention_chunks, map_in_chunks, num_chunks

Dtype = Any
glorot = nn.initializers.xavier_uniform()
ATTENTION_TYPES = ("external", "self")


def keras_embedding_init(key, shape, dtype=jnp.float32):
    """Keras `Embedding`'s default initialiser: uniform in [-0.05, 0.05)."""
    return jax.random.uniform(key, shape, dtype, minval=-0.05, maxval=0.05)


def extract_patches(images: jax.Array, patch_size: int) -> jax.Array:
    """Non-overlapping square patches: [B, H, W, C] -> [B, (H/p) * (W/p), p * p * C].

    Patches are numbered row by row and each is flattened in (row, col, channel) order, as
    `keras.ops.image.extract_patches` (and `tf.image.extract_patches`) do.
    """
    batch, height, width, channels = images.shape
    p = patch_size
    x = images.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def softmax_over_tokens(logits: jax.Array, token_axis: int = 1) -> jax.Array:
    """Step 1, in float32: each memory slot's weights over the N tokens sum to 1. Same shape."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=token_axis)


def l1_over_slots(attn: jax.Array) -> jax.Array:
    """Step 2: each token's weights over the S memory slots (last axis) sum to 1. Same shape."""
    return attn / (1e-9 + jnp.sum(attn, axis=-1, keepdims=True))


def double_normalize(logits: jax.Array, token_axis: int = 1) -> jax.Array:
    """External attention's double normalisation: [..., N, ..., S] -> float32, same shape.

    A softmax over the tokens (`token_axis`), then an L1 normalisation over the memory slots (the
    last axis, with the tutorial's 1e-9 in the denominator).
    """
    return l1_over_slots(softmax_over_tokens(logits, token_axis))


def keep_mask(module: nn.Module, rate: float, shape: tuple[int, ...],
              train: bool) -> jax.Array | None:
    """The keep mask [shape] that `nn.Dropout(rate)` would draw, from `module`'s "dropout" rng, or
    None when nothing is dropped (evaluation, or rate 0). Drawn for the whole batch, so that
    computing the layer in chunks of examples does not change it."""
    if not train or rate == 0:
        return None
    return jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, shape)


def apply_dropout(x: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """`nn.Dropout` with a given mask: kept values divided by 1 - rate, the rest 0. Same shape."""
    if keep is None:
        return x
    if rate == 1:
        return jnp.zeros_like(x)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class DenseParams(nn.Module):
    """A Keras Dense layer's variables, returned, not applied: () -> (kernel [*in, *out], bias [*out]).

    Glorot-uniform kernel and zero bias, stored as {kernel, bias} exactly as `nn.Dense` (int shapes)
    or `nn.DenseGeneral` (tuples) store them. The Glorot fans are Keras' for the kernel's shape:
    Keras takes a rank-3 kernel for a conv kernel, so MultiHeadAttention's query [dim, heads, dim]
    gets fan_in = heads * dim, fan_out = dim * dim (std 0.021 for the ViT baseline, not the matrix
    [dim, heads * dim]'s 0.079) and its output [heads, dim, dim] fan_in = fan_out = heads * dim.
    Flax's `xavier_uniform` on the full shape computes the same. That is what the tutorial ran with
    (tf.keras; recent Keras 3, e.g. 3.15.1, computes matrix fans instead).
    """

    in_shape: int | tuple[int, ...]
    out_shape: int | tuple[int, ...]

    @nn.compact
    def __call__(self):
        in_shape, out_shape = (tuple(np.atleast_1d(s)) for s in (self.in_shape, self.out_shape))
        kernel = self.param("kernel", glorot, in_shape + out_shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, out_shape, jnp.float32)
        return kernel, bias


def fold_memories(dim: int, heads: int, head_dim: int, memory_slots: int) -> bool:
    """Whether folding the memories into the outer Dense layers saves multiply-adds.

    Per token, the tutorial's order costs dim*inner (expand) + inner*S (M_k, all heads) + inner*S
    (M_v) + inner*dim (out), with inner = heads * head_dim; the folded maps cost dim*heads*S twice.
    For the tutorial (dim 64, 16 heads of 16, S = 16) folding costs 32,768 instead of 40,960 and
    replaces the 16-wide memory matmuls, slow on CPU, by 256-wide ones; for the paper's S = 64 it
    would cost 131,072 instead of 65,536, so the memories are then applied as in the tutorial.
    """
    inner = heads * head_dim
    return dim * heads * memory_slots <= dim * inner + inner * memory_slots


class ExternalAttention(nn.Module):
    """Multi-head external attention with two shared memories: [B, N, dim] -> [B, N, dim].

    Laid out as [B, N, heads, ...] throughout (the tutorial transposes to [B, heads, N, ...]), so
    splitting and merging the heads are free reshapes. The parameters are the tutorial's four Dense
    layers (`expand` dim -> inner, `memory_key` head_dim -> S, `memory_value` S -> head_dim, `out`
    inner -> dim). When `fold_memories` says it is cheaper, the linear maps on either side of the
    double normalisation are composed first (expand then M_k into one [dim, heads * S] kernel, M_v
    then out into one [heads * S, dim] kernel): the same function of the same parameters, computed
    in a different order. On CPU the attention runs a few examples at a time (`chunking.py`: the
    softmax over tokens then reads each example's weights from cache); the dropout mask is drawn
    for the whole batch first, so it does not depend on the chunking.
    """

    num_heads: int
    dim_coefficient: int
    memory_slots: int
    attention_dropout: float
    projection_dropout: float
    dtype: Dtype = jnp.float32

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
        fold = fold_memories(dim, heads, head_dim, slots)

        def dense(inputs, kernel, bias):
            return inputs.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)

        if fold:  # (x W_e + b_e) W_k + b_k = x (W_e W_k) + (b_e W_k + b_k), per head
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
            return from_weights(apply_dropout(weights, keep, self.attention_dropout))

        keep = keep_mask(self, self.attention_dropout, (batch, tokens, heads, slots), train)
        y = map_in_chunks(attention, num_chunks(batch, tokens * heads * slots * 4), x, keep)
        return nn.Dropout(self.projection_dropout)(y, deterministic=not train)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
           rate: float) -> jax.Array:
    """softmax(q k^T) v with dropout on the weights: [B, h, N, d] x 3 -> [B, h, N, d].

    `q` comes scaled; the softmax is in float32; `keep` [B, h, N, N] is the dropout's keep mask
    (`keep_mask`) for dropout `rate`, or None.
    """
    scores = q @ k.swapaxes(-1, -2)  # [B, h, N, N]
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    return apply_dropout(weights, keep, rate).astype(v.dtype) @ v


def multi_head_self_attention(params: dict, x: jax.Array, keep: jax.Array | None, *,
                              rate: float, dtype: Dtype) -> jax.Array:
    """Projections, attention, output projection: x [B, N, c] -> [B, N, c].

    `params` maps query/key/value to (kernel [c, h, d], bias [h, d]) and out to (kernel [h, d, c],
    bias [c]). The projections produce heads first, [B, h, N, d], so that both attention products
    are plain batched matmuls (with the heads in the middle XLA:CPU laid the weights-times-values
    product out transposed and ran the attention a third slower on the tutorial's shapes).
    """
    x = x.astype(dtype)

    def project(name):  # [B, N, c] -> [B, h, N, d]
        kernel, bias = params[name]
        return (jnp.einsum("bnc,chd->bhnd", x, kernel.astype(dtype))
                + bias[:, None, :].astype(dtype))

    q, k, v = project("query"), project("key"), project("value")
    q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    attended = attend(q, k, v, keep, rate)
    kernel, bias = params["out"]
    return jnp.einsum("bhnd,hdc->bnc", attended, kernel.astype(dtype)) + bias.astype(dtype)


class SelfAttention(nn.Module):
    """Keras `MultiHeadAttention(num_heads, key_dim=dim)` self-attention: [B, N, d] -> [B, N, d].

    Query/key/value projections to [heads, dim] with bias, scores scaled by 1/sqrt(dim), softmax in
    float32, dropout on the weights, output projection from [heads, dim] to dim with bias. As in the
    tutorial's ViT baseline, there is no dropout after the output projection. The parameters are
    stored as `nn.DenseGeneral` stores them. On CPU the layer runs a few examples at a time
    (`chunking.py`); the dropout mask is drawn for the whole batch first, so it does not depend on
    the chunking.
    """

    num_heads: int
    attention_dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        batch, tokens, dim = x.shape
        heads = self.num_heads
        params = {name: DenseParams(dim, (heads, dim), name=name)()
                  for name in ("query", "key", "value")}
        params["out"] = DenseParams((heads, dim), dim, name="out")()
        keep = keep_mask(self, self.attention_dropout, (batch, heads, tokens, tokens), train)
        layer = functools.partial(multi_head_self_attention, params, rate=self.attention_dropout,
                                  dtype=self.dtype)
        return map_in_chunks(layer, attention_chunks(batch, heads, tokens, tokens), x, keep)


class Mlp(nn.Module):
    """Dense(mlp_dim) + GELU, dropout, Dense(dim), dropout: [B, N, dim] -> [B, N, dim].

    GELU is exact (erf) or, with `gelu_approximate`, the tanh approximation.
    """

    mlp_dim: int
    dropout: float
    gelu_approximate: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=glorot, dtype=self.dtype)(x),
                    approximate=self.gelu_approximate)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = nn.Dense(dim, kernel_init=glorot, dtype=self.dtype)(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class EncoderBlock(nn.Module):
    """Pre-LN block, x + Attn(LN(x)) then x + MLP(LN(x)): [B, N, dim] -> [B, N, dim]."""

    mlp_dim: int
    num_heads: int
    dim_coefficient: int
    memory_slots: int
    attention_dropout: float
    projection_dropout: float
    attention: str
    gelu_approximate: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=jnp.float32)
        if self.attention == "external":
            attend = ExternalAttention(self.num_heads, self.dim_coefficient, self.memory_slots,
                                       self.attention_dropout, self.projection_dropout,
                                       dtype=self.dtype, name="attention")
        else:
            attend = SelfAttention(self.num_heads, self.attention_dropout, dtype=self.dtype,
                                   name="attention")
        x = x + attend(layer_norm()(x), train=train)
        return x + Mlp(self.mlp_dim, self.projection_dropout, self.gelu_approximate,
                       dtype=self.dtype)(layer_norm()(x), train=train)


class EANet(nn.Module):
    """The tutorial's EANet or its ViT baseline: images [B, H, W, 3] -> (logits [B, classes], None).

    N = (H/p) * (W/p) tokens: 256 for the tutorial's 32x32 inputs and 2x2 patches. `attention` is
    "external" (EANet) or "self" (the ViT baseline, which ignores `dim_coefficient` and
    `memory_slots`). `gelu_approximate`: the MLP's GELU, exact (erf, False: `tf.nn.gelu`, the
    TensorFlow 2 tutorial behind the published 43.91%) or the tanh approximation (True: the Keras 3
    text's `ops.gelu`). There is no class token, so no attention map is returned.
    """

    num_classes: int
    patch_size: int
    dim: int
    mlp_dim: int
    num_heads: int
    dim_coefficient: int
    num_blocks: int
    attention_dropout: float
    projection_dropout: float
    attention: str
    memory_slots: int
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise UserError(f"unknown attention {self.attention!r}: set config.model.attention to "
                            f"one of {', '.join(ATTENTION_TYPES)}")
        if self.dim % self.num_heads:
            raise UserError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}: set "
                            "config.model.dim to a multiple of config.model.num_heads")
        super().__post_init__()

    @nn.compact
    def __call__(self, images, *, train: bool):
        _, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise UserError(f"image size {height}x{width} is not divisible by patch_size "
                            f"{self.patch_size}: set config.model.patch_size to a divisor of both")
        patches = extract_patches(images, self.patch_size)  # [B, N, p*p*3]
        x = nn.Dense(self.dim, kernel_init=glorot, dtype=self.dtype, name="patch_embed")(patches)
        position = self.param("pos_embed", keras_embedding_init, (patches.shape[1], self.dim),
                              jnp.float32)
        x = x + position
        for i in range(self.num_blocks):
            x = EncoderBlock(self.mlp_dim, self.num_heads, self.dim_coefficient, self.memory_slots,
                             self.attention_dropout, self.projection_dropout, self.attention,
                             self.gelu_approximate, dtype=self.dtype, name=f"block{i}")(
                x, train=train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=1)  # [B, dim]
        logits = nn.Dense(self.num_classes, kernel_init=glorot, dtype=jnp.float32,
                          name="head")(pooled)
        return logits, None
