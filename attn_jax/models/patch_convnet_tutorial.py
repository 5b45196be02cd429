"""PatchConvNet as built by the Keras tutorial "Augmenting convnets with aggregated attention".

Touvron et al., "Augmenting convolutional networks with attention-based aggregation" (2021), in the
simplified form of the keras-io `patch_convnet` example (CIFAR-10, 1,436,426 trainable parameters):

    image [B, 48, 48, 3]
      -> ConvStem: 3x3/2 conv + GELU (d/2), 3x3/2 conv + GELU (d)       -> [B, 12, 12, d]
      -> Trunk: `depth` x  x + Conv1x1(SE(GELU(Conv3x3(GELU(Conv1x1(LN(x)))))))
      -> flatten                                                         -> [B, 144, d]
      -> AttentionPooling: class token attends to [cls; patches]         -> [B, d]
      -> Dense head                                                      -> logits [B, classes]

Differences from the paper (implemented in `patch_convnet.py`;
docs/faithfulness.md#patchconvnet-the-tutorial-against-the-paper): a two-conv stem with biases, a
full (not depthwise) 3x3 conv, squeeze-excite by Dense layers without bias at ratio 1/8, no
layer-scale or drop-path, a LayerNorm over [cls; patches] before attention, a Dense-GELU-Dense-GELU
class MLP, and Keras' initialisers (`keras_init`). GELU is exact, as `tf.nn.gelu`.

The trunk's weights are shared (`tie_trunk`): the tutorial's `Trunk.build` wraps ONE list of layers
`depth` times, and Keras layers own their weights, so its model (1,436,426 parameters at d = 256,
depth 2, the one behind its published 84.59%) applies one block twice. `tie_trunk=True` reproduces
it (`TrunkBlock_shared` called `depth` times; experiments/patch_convnet.py); `tie_trunk=False`
builds `depth` independent blocks (2,174,986 parameters), the network the tutorial's prose and the
paper describe.

The convolutions, GELU and the pooling's attention are fields (`conv`, `gelu`, `class_attention`)
that `config.model.impl` may fill from `attn_jax.fast`: the same function, faster on CPU.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.keras_init import glorot, keras_glorot

Dtype = Any
ModuleDef = Any
exact_gelu = functools.partial(nn.gelu, approximate=False)  # 0.5 x erfc(-x / sqrt 2), as tf.nn.gelu
SHARED_BLOCK = "TrunkBlock_shared"  # the trunk block of `tie_trunk=True`


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs with bias and GELU: [B, H, W, 3] -> [B, H/4, W/4, dim]."""

    dim: int
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    gelu: Callable = exact_gelu

    @nn.compact
    def __call__(self, x):
        for features in (self.dim // 2, self.dim):
            x = self.conv(features, (3, 3), strides=2, padding="SAME", kernel_init=glorot,
                     dtype=self.dtype)(x)
            x = self.gelu(x)
        return x


class SqueezeExcite(nn.Module):
    """Channel gating by the global mean: [B, H, W, C] -> [B, H, W, C] (Dense layers, no bias)."""

    ratio: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Dense(channels // self.ratio, use_bias=False, kernel_init=glorot,
                             dtype=self.dtype, name="reduce")(s))
        s = nn.sigmoid(nn.Dense(channels, use_bias=False, kernel_init=glorot, dtype=self.dtype,
                                name="expand")(s))
        return x * s


class TrunkBlock(nn.Module):
    """x + Conv1x1(SE(GELU(Conv3x3(GELU(Conv1x1(LN(x))))))): [B, H, W, d] -> [B, H, W, d]."""

    se_ratio: int
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    gelu: Callable = exact_gelu

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        conv = functools.partial(self.conv, dim, padding="SAME", kernel_init=glorot, dtype=self.dtype)
        y = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32)(x)
        y = self.gelu(conv((1, 1))(y))
        y = self.gelu(conv((3, 3))(y))
        y = SqueezeExcite(self.se_ratio, dtype=self.dtype)(y)
        y = conv((1, 1))(y)
        return x + y


def reference_class_attention(x: jax.Array, query: nn.Module, key: nn.Module, value: nn.Module,
                              dropout: Callable[[jax.Array], jax.Array]
                              ) -> tuple[jax.Array, jax.Array]:
    """Keras' one-head MultiHeadAttention with the class token as the only query:
    x = [cls; patches] [B, N + 1, d] -> (attended [B, 1, heads=1, d], weights [B, 1, 1, N + 1]).

    `query`, `key`, `value` are the projections (DenseGeneral to [1 head, d], with bias) and
    `dropout` the attention dropout, applied to the softmax weights; `weights` are before it."""
    q = query(x[:, :1])  # [B, 1, 1, d]
    k = key(x)  # [B, N + 1, 1, d]
    v = value(x)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, 1, 1, N + 1]
    attended = jnp.einsum("bhqk,bkhd->bqhd", dropout(weights).astype(v.dtype), v)
    return attended, weights


class AttentionPooling(nn.Module):
    """A learnable class token attends to the patches: [B, N, d] -> (cls [B, d], attn [B, N]).

    One-head attention with Keras' MultiHeadAttention layout (query/key/value projections to
    `[1 head, d]` with bias, output projection back to d); the query is the class token only, the
    keys and values are [cls; patches] (`class_attention`, a field: `config.model.impl` may give
    `attn_jax.fast.folded_class_attention`, the same function with the projections folded into the
    one query). `attn` is the class token's softmax weight on each patch
    before attention dropout, with its weight on itself dropped and the rest renormalised to sum to
    1 (the tutorial plots the unnormalised slice; a colormap rescales it, so the picture is the same).
    """

    attention_dropout: float
    mlp_dropout: float
    dtype: Dtype = jnp.float32
    gelu: Callable = exact_gelu
    class_attention: Callable = reference_class_attention

    @nn.compact
    def __call__(self, patches, *, train: bool):
        batch, _, dim = patches.shape
        layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=jnp.float32)
        dense = functools.partial(nn.Dense, dim, kernel_init=glorot, dtype=self.dtype)
        proj = functools.partial(nn.DenseGeneral, (1, dim), kernel_init=keras_glorot((dim, 1, dim)),
                                 dtype=self.dtype)

        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, dim), jnp.float32)
        cls = jnp.broadcast_to(cls, (batch, 1, dim))
        x = layer_norm()(jnp.concatenate([cls, patches.astype(jnp.float32)], axis=1))

        dropout = functools.partial(nn.Dropout(self.attention_dropout), deterministic=not train)
        attended, weights = self.class_attention(x, proj(name="query"), proj(name="key"),
                                                 proj(name="value"), dropout)
        attended = nn.DenseGeneral(dim, axis=(-2, -1), kernel_init=keras_glorot((1, dim, dim)),
                                   dtype=self.dtype, name="out")(attended)  # [B, 1, d]

        cls = layer_norm()(cls + attended)[:, 0]  # [B, d]
        cls = layer_norm()(cls)
        mlp = self.gelu(dense()(cls))
        mlp = nn.Dropout(self.mlp_dropout)(mlp, deterministic=not train)
        cls = cls + self.gelu(dense()(mlp))
        on_patches = weights[:, 0, 0, 1:]
        return cls, on_patches / jnp.sum(on_patches, axis=-1, keepdims=True)


class PatchConvNetTutorial(nn.Module):
    """The tutorial's PatchConvNet: images [B, H, W, 3] -> (logits [B, classes], attn [B, N]).

    N = (H/4) * (W/4) patches: 144 for the tutorial's 48x48 inputs. `tie_trunk`: True applies one
    trunk block (`TrunkBlock_shared`) `depth` times, the tutorial's code and the model it trained;
    False gives `depth` independent blocks (`TrunkBlock_0`, ...), what its prose describes.
    """

    num_classes: int
    dim: int
    depth: int
    se_ratio: int
    attention_dropout: float
    mlp_dropout: float
    tie_trunk: bool
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv  # or attn_jax.fast.Conv (same parameters): config.model.impl
    gelu: Callable = exact_gelu  # or attn_jax.fast.gelu (the same function): config.model.impl
    class_attention: Callable = reference_class_attention  # or fast.folded_class_attention

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = ConvStem(self.dim, dtype=self.dtype, conv=self.conv, gelu=self.gelu)(images)
        block = functools.partial(TrunkBlock, self.se_ratio, dtype=self.dtype, conv=self.conv,
                                  gelu=self.gelu)
        if self.tie_trunk:  # one module, so one set of weights, called `depth` times
            blocks = [block(name=SHARED_BLOCK)] * self.depth
        else:  # TrunkBlock_0 ... TrunkBlock_{depth-1}
            blocks = [block() for _ in range(self.depth)]
        for block in blocks:
            x = block(x)
        patches = x.reshape(x.shape[0], -1, self.dim)
        cls, attention = AttentionPooling(self.attention_dropout, self.mlp_dropout,
                                          dtype=self.dtype, gelu=self.gelu,
                                          class_attention=self.class_attention)(patches, train=train)
        logits = nn.Dense(self.num_classes, kernel_init=glorot, dtype=jnp.float32,
                          name="head")(cls)
        return logits, attention

    def summary_notes(self) -> list[str]:
        """Lines `--mode=summary` prints under the parameter table: how the trunk is applied."""
        if self.tie_trunk:
            return [f"trunk: one shared block, {SHARED_BLOCK}, applied {self.depth} times "
                    "(tie_trunk=True, as the tutorial's code)"]
        return [f"trunk: {self.depth} independent blocks (tie_trunk=False)"]
