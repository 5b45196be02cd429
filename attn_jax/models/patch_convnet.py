"""PatchConvNet as in the paper and its official PyTorch code (S60 ... L120).

Touvron et al., "Augmenting convolutional networks with attention-based aggregation" (2021,
arXiv 2112.13692), following `patchconvnet_models.py` of facebookresearch/deit:

    image [B, H, W, 3]
      -> ConvStem: `stem_convs` x 3x3/2 conv (no bias), GELU between them  -> [B, H/16, W/16, d]
      -> Trunk: `depth` x  x + drop_path(layer_scale * ConvBlock(LN(x)))     -> [B, H/16, W/16, d]
      -> flatten                                                             -> [B, N, d]
      -> ClassAttentionBlock: a learned class token attends to [cls; patches] -> [B, d]
      -> LayerNorm, Dense head                                               -> logits [B, classes]

(the sizes above are for the paper's four stem convs; with `stem_convs = s` the grid is H/2^s).

As in the official code (docs/faithfulness.md#patchconvnet-the-tutorial-against-the-paper): exact
GELU; timm's squeeze-excite; LayerNorm eps 1e-6 everywhere; one-head class attention with separate
Q/K/V linears with bias and an output projection, then a Dense(mlp_ratio * d)-GELU-Dense(d) MLP;
drop-path at the same rate in every block; PyTorch's conv padding and initialisers (`torch_conv`,
`normal_02`).

Where the official code leaves room:
- Mixed precision (the official code trains in float32 with autocast): convs and Dense layers
  compute in `dtype`, LayerNorm, softmax and the logits in float32, and the residual streams (trunk
  and class token) stay in float32: in bfloat16 a 1e-6 layer-scaled update would be rounded away
  against an O(1) residual.
- The class block's MLP dropouts and drop-path are 0 in every official variant and not exposed;
  its attention dropout is.
- The final LayerNorm normalises the class token alone, where the official code normalises
  [cls; patches] and keeps the class token: a LayerNorm acts per token, so it is the same.
- The attention map is the class token's softmax weights over the N patches before attention
  dropout, its weight on itself dropped and the rest renormalised to sum to 1.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any
gelu = functools.partial(nn.gelu, approximate=False)
# Dense kernels and the class token: timm's trunc_normal_(std=.02) is truncated at an absolute +-2
# = +-100 std, so in effect normal(0.02). (Flax's truncated_normal(0.02) would truncate at +-2 std
# without rescaling: std 0.0176, 12% small.)
normal_02 = nn.initializers.normal(stddev=0.02)
# PyTorch nn.Conv2d default, which the official code keeps for its convs: kaiming_uniform(a=sqrt(5))
# = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias(fan_in: int):
    """PyTorch nn.Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv(conv: ModuleDef, features: int, kernel: int, in_features: int, *, stride: int = 1,
               groups: int = 1, use_bias: bool = True, dtype: Dtype, name: str | None = None):
    """A `conv` (`nn.Conv`, or `attn_jax.fast.Conv`) with PyTorch's padding (kernel // 2 each side:
    224 -> 112 -> 56 -> 28 -> 14 in the stem, where "SAME" would pad (0, 1) for a stride-2 conv on
    an even size) and default initialisation (fan_in = in_channels / groups * kh * kw)."""
    fan_in = in_features // groups * kernel * kernel
    pad = kernel // 2
    return conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                feature_group_count=groups, use_bias=use_bias, kernel_init=torch_conv_kernel,
                bias_init=torch_conv_bias(fan_in), dtype=dtype, name=name)


class LayerScale(nn.Module):
    """Per-channel learnable scale `layer_scale` (init `init_value`): [..., d] -> [..., d] (f32)."""

    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("layer_scale", nn.initializers.constant(self.init_value),
                           (x.shape[-1],), jnp.float32)
        return gamma * x.astype(jnp.float32)


class ConvStem(nn.Module):
    """`num_convs` 3x3 stride-2 convs without bias, GELU between them:
    [B, H, W, 3] -> [B, H / 2^n, W / 2^n, dim] (float32).

    Channels are the last `num_convs` of (dim/8, dim/4, dim/2, dim), as in the official 4-conv stem.
    """

    dim: int
    num_convs: int
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x):
        widths = [self.dim // 2 ** (self.num_convs - 1 - i) for i in range(self.num_convs)]
        in_features = x.shape[-1]
        for i, features in enumerate(widths):
            if i:
                x = gelu(x)
            x = torch_conv(self.conv, features, 3, in_features, stride=2, use_bias=False, dtype=self.dtype)(x)
            in_features = features
        return x.astype(jnp.float32)


class SqueezeExcite(nn.Module):
    """timm SqueezeExcite(rd_ratio=0.25): x * sigmoid(conv(relu(conv(mean_hw(x))))):
    [B, H, W, C] -> [B, H, W, C]."""

    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        reduced = round(channels * 0.25)
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(torch_conv(self.conv, reduced, 1, channels, dtype=self.dtype, name="reduce")(s))
        s = nn.sigmoid(torch_conv(self.conv, channels, 1, reduced, dtype=self.dtype, name="expand")(s))
        return x * s


class TrunkBlock(nn.Module):
    """x + drop_path(layer_scale * F(LN(x))), F = 1x1 conv, GELU, depthwise 3x3 conv, GELU, SE,
    1x1 conv: [B, H, W, d] -> [B, H, W, d] (float32). LayerNorm eps 1e-6 (the official
    `norm_layer`); the drop-path rate is the same in every block (`dpr_constant=True`)."""

    layer_scale_init: float
    drop_path_rate: float
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]
        y = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32)(x)
        y = gelu(torch_conv(self.conv, dim, 1, dim, dtype=self.dtype)(y))
        y = gelu(torch_conv(self.conv, dim, 3, dim, groups=dim, dtype=self.dtype, name="depthwise")(y))
        y = SqueezeExcite(dtype=self.dtype, conv=self.conv)(y)
        y = torch_conv(self.conv, dim, 1, dim, dtype=self.dtype)(y)
        y = LayerScale(self.layer_scale_init)(y)
        # Drop-path: one Bernoulli(keep) per sample from the "dropout" rng stream, kept samples
        # scaled by 1 / keep.
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
            y, deterministic=not train)
        return x + y


class ClassAttentionBlock(nn.Module):
    """The official Layer_scale_init_Block_only_token with a learned class token:
    patches [B, N, d] -> (cls [B, d] float32, attn [B, N] summing to 1).

    u = LN([cls; patches]);  cls += layer_scale * proj(softmax(q(u_cls) k(u)^T / sqrt(d)) v(u));
    cls += layer_scale * MLP(LN(cls)). q, k, v and proj are Dense layers with bias (the official
    `qkv_bias=True` in every variant).
    """

    mlp_ratio: float
    layer_scale_init: float
    attention_dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, *, train: bool):
        batch, _, dim = patches.shape
        dense = functools.partial(nn.Dense, kernel_init=normal_02,
                                  bias_init=nn.initializers.zeros, dtype=self.dtype)
        layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=jnp.float32)

        cls = self.param("cls_token", normal_02, (1, 1, dim), jnp.float32)
        cls = jnp.broadcast_to(cls, (batch, 1, dim))
        u = layer_norm(name="norm1")(jnp.concatenate([cls, patches.astype(jnp.float32)], axis=1))
        q = dense(dim, name="query")(u[:, :1])  # [B, 1, d]
        k = dense(dim, name="key")(u)  # [B, N + 1, d]
        v = dense(dim, name="value")(u)
        scores = jnp.einsum("bqd,bkd->bqk", q * (dim ** -0.5), k)
        weights = nn.softmax(scores.astype(jnp.float32), axis=-1)  # [B, 1, N + 1]
        dropped = nn.Dropout(self.attention_dropout)(weights, deterministic=not train)
        attended = jnp.einsum("bqk,bkd->bqd", dropped.astype(v.dtype), v)
        attended = dense(dim, name="proj")(attended)
        cls = cls + LayerScale(self.layer_scale_init, name="gamma_1")(attended)

        hidden = int(dim * self.mlp_ratio)
        mlp = gelu(dense(hidden, name="fc1")(layer_norm(name="norm2")(cls)))
        mlp = dense(dim, name="fc2")(mlp)
        cls = cls + LayerScale(self.layer_scale_init, name="gamma_2")(mlp)

        on_patches = weights[:, 0, 1:]
        return cls[:, 0], on_patches / jnp.sum(on_patches, axis=-1, keepdims=True)


class PatchConvNet(nn.Module):
    """The paper's PatchConvNet: images [B, H, W, 3] -> (logits [B, classes] float32, attn [B, N]).

    N = (H / 2^stem_convs) * (W / 2^stem_convs) patches: 196 for 224x224 and the paper's 4 convs.
    """

    num_classes: int
    dim: int
    depth: int
    stem_convs: int
    layer_scale_init: float
    drop_path_rate: float
    mlp_ratio: float
    attention_dropout: float
    dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv  # or attn_jax.fast.Conv (same parameters): config.model.impl

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = ConvStem(self.dim, self.stem_convs, dtype=self.dtype, conv=self.conv, name="stem")(images)
        for i in range(self.depth):
            x = TrunkBlock(self.layer_scale_init, self.drop_path_rate, dtype=self.dtype, conv=self.conv,
                           name=f"block_{i}")(x, train=train)
        patches = x.reshape(x.shape[0], -1, self.dim)
        cls, attention = ClassAttentionBlock(self.mlp_ratio, self.layer_scale_init,
                                             self.attention_dropout, dtype=self.dtype,
                                             name="pooling")(patches, train=train)
        cls = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="norm")(cls)
        logits = nn.Dense(self.num_classes, kernel_init=normal_02,
                          bias_init=nn.initializers.zeros, dtype=jnp.float32, name="head")(cls)
        return logits, attention


_PAPER = dict(stem_convs=4, mlp_ratio=3.0)
# The paper's variants (patch 16, one head). They fix the architecture and its initialisation;
# num_classes, drop_path_rate, attention_dropout and dtype are the caller's.
S60 = functools.partial(PatchConvNet, dim=384, depth=60, layer_scale_init=1e-4, **_PAPER)
S120 = functools.partial(PatchConvNet, dim=384, depth=120, layer_scale_init=1e-6, **_PAPER)
B60 = functools.partial(PatchConvNet, dim=768, depth=60, layer_scale_init=1e-6, **_PAPER)
B120 = functools.partial(PatchConvNet, dim=768, depth=120, layer_scale_init=1e-6, **_PAPER)
L60 = functools.partial(PatchConvNet, dim=1024, depth=60, layer_scale_init=1e-6, **_PAPER)
L120 = functools.partial(PatchConvNet, dim=1024, depth=120, layer_scale_init=1e-6, **_PAPER)
VARIANTS = {"S60": S60, "S120": S120, "B60": B60, "B120": B120, "L60": L60, "L120": L120}
