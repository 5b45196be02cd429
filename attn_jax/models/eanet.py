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

External attention (per block, `ExternalAttention`): Dense(dim * coef), split into num_heads * coef
heads, memory keys M_k = Dense(S) shared across heads, softmax over the tokens, L1 over the S memory
slots (the "double normalisation"), dropout, memory values M_v = Dense(head_dim), merge heads,
Dense(dim), dropout. The ViT baseline's self-attention is flax's `nn.MultiHeadDotProductAttention`
with Keras' MultiHeadAttention settings (`self_attention`).

Differences (docs/faithfulness.md#eanet-the-tutorial-against-the-paper): the tutorial has
S = dim // dim_coefficient = 16 memory slots, the paper S = 64 (`memory_slots` chooses). The MLP's
GELU (`gelu_approximate`) is exact by default, as `tf.nn.gelu` in the TensorFlow 2 tutorial behind
the published 43.91%; True gives the tanh approximation of the current Keras 3 text's `ops.gelu`.
The tutorial's softmax head is left to the loss: the model returns logits. Initialisers follow
Keras (`keras_init`). The layers are fields (`external_attention`, `attention_fn`) that
`config.model.impl` may fill from `attn_jax.fast`: the same function, faster on CPU.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.keras_init import glorot, keras_embedding_init, keras_glorot

Dtype = Any
ModuleDef = Any
ATTENTION_TYPES = ("external", "self")


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


class ExternalAttention(nn.Module):
    """Multi-head external attention with two memories shared by the heads: [B, N, dim] -> [B, N, dim].

    Laid out as [B, N, heads, ...] throughout (the tutorial transposes to [B, heads, N, ...]), so
    splitting and merging the heads are free reshapes; h = num_heads * dim_coefficient heads of
    d = dim / num_heads, S = memory_slots.
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
        head_dim = dim * self.dim_coefficient // heads
        dense = functools.partial(nn.Dense, kernel_init=glorot, dtype=self.dtype)

        x = dense(heads * head_dim, name="expand")(x)  # [B, N, h * d]
        x = x.reshape(batch, tokens, heads, head_dim)  # split heads: [B, N, h, d]
        attn = dense(self.memory_slots, name="memory_key")(x)  # M_k: [B, N, h, S]
        attn = double_normalize(attn, token_axis=1)  # softmax over N, then L1 over S
        attn = nn.Dropout(self.attention_dropout, name="attention_dropout")(
            attn, deterministic=not train)
        x = dense(head_dim, name="memory_value")(attn)  # M_v: [B, N, h, d]
        x = x.reshape(batch, tokens, heads * head_dim)  # merge heads: [B, N, h * d]
        x = dense(dim, name="out")(x)  # [B, N, dim]
        return nn.Dropout(self.projection_dropout, name="projection_dropout")(
            x, deterministic=not train)


def self_attention(num_heads: int, dim: int, attention_dropout: float, dtype: Dtype,
                   attention_fn: Callable, name: str) -> nn.MultiHeadDotProductAttention:
    """Keras `MultiHeadAttention(num_heads, key_dim=dim)` as flax's layer: [B, N, dim] -> [B, N, dim].

    Query/key/value projections to [heads, dim] with bias, scores scaled by 1/sqrt(dim), softmax in
    float32, dropout on the weights (a mask per example: `broadcast_dropout=False`), output projection
    from [heads, dim] to dim with bias; Keras' Glorot fans for the rank-3 kernels. As in the
    tutorial's ViT baseline, there is no dropout after the output projection.
    """
    return nn.MultiHeadDotProductAttention(
        num_heads, dtype=dtype, qkv_features=num_heads * dim, out_features=dim,
        broadcast_dropout=False, dropout_rate=attention_dropout, force_fp32_for_softmax=True,
        kernel_init=keras_glorot((dim, num_heads, dim)),
        out_kernel_init=keras_glorot((num_heads, dim, dim)), attention_fn=attention_fn, name=name)


class Mlp(nn.Module):
    """Dense(mlp_dim) + GELU, dropout, Dense(dim), dropout: [B, N, dim] -> [B, N, dim].

    GELU is exact (erf) or, with `gelu_approximate`, the tanh approximation (`ops.gelu`'s default in
    Keras 3); the two differ by less than 1e-3 per activation.
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
    external_attention: ModuleDef = ExternalAttention
    attention_fn: Callable = nn.dot_product_attention

    @nn.compact
    def __call__(self, x, *, train: bool):
        layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=jnp.float32)
        y = layer_norm()(x)
        if self.attention == "external":
            y = self.external_attention(
                self.num_heads, self.dim_coefficient, self.memory_slots, self.attention_dropout,
                self.projection_dropout, dtype=self.dtype, name="attention")(y, train=train)
        else:
            y = self_attention(self.num_heads, x.shape[-1], self.attention_dropout, self.dtype,
                               self.attention_fn, name="attention")(y, deterministic=not train)
        x = x + y
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
    # The layers (attn_jax.fast has speed versions with the same parameters: config.model.impl).
    external_attention: ModuleDef = ExternalAttention
    attention_fn: Callable = nn.dot_product_attention  # the self-attention's softmax(q k^T / sqrt(d)) v

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention {self.attention!r}: set config.model.attention to "
                             f"one of {', '.join(ATTENTION_TYPES)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}: set "
                             "config.model.dim to a multiple of config.model.num_heads")
        super().__post_init__()

    @nn.compact
    def __call__(self, images, *, train: bool):
        _, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size "
                             f"{self.patch_size}: set config.model.patch_size to a divisor of both")
        patches = extract_patches(images, self.patch_size)  # [B, N, p*p*3]
        x = nn.Dense(self.dim, kernel_init=glorot, dtype=self.dtype, name="patch_embed")(patches)
        position = self.param("pos_embed", keras_embedding_init, (patches.shape[1], self.dim),
                              jnp.float32)
        x = x + position
        for i in range(self.num_blocks):
            x = EncoderBlock(self.mlp_dim, self.num_heads, self.dim_coefficient, self.memory_slots,
                             self.attention_dropout, self.projection_dropout, self.attention,
                             self.gelu_approximate, dtype=self.dtype,
                             external_attention=self.external_attention,
                             attention_fn=self.attention_fn, name=f"block{i}")(
                x, train=train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=1)  # [B, dim]
        logits = nn.Dense(self.num_classes, kernel_init=glorot, dtype=jnp.float32,
                          name="head")(pooled)
        return logits, None
