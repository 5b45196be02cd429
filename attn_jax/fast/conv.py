"""A 2-D convolution whose kernel gradient is a matrix multiply: `Conv`, a drop-in for `nn.Conv`.

XLA:CPU runs a convolution's forward pass and its input gradient near matrix-multiply speed, but
the kernel gradient (a convolution contracting over batch and space) falls back to a loop far below
it (docs/performance.md#convolution-kernel-gradients). `conv_general_dilated` here computes the
same function with a custom VJP:

- forward and input gradient: `lax.conv_general_dilated` and its transpose, as `nn.Conv` computes
  them (a 1x1, stride-1 conv is a plain matmul and is done as one);
- kernel gradient: for each of the kh * kw kernel taps, the strided window of the (padded) input
  that tap sees, flattened to [B * Ho * Wo, C], transposed times the output gradient [B * Ho * Wo, O]:
  kh * kw matmuls with a long contraction, which XLA:CPU runs at matmul speed.

A float32 3x3 convolution of stride 1 with SAME padding (the tutorial trunk's) goes instead to
`winograd.conv3x3`, which computes it, and both its gradients, with 4x fewer multiplies.
Only the plain case is rerouted (NHWC inputs, HWIO kernel, no dilation, one feature group); any
other call (the paper's depthwise convs among them) goes to `lax.conv_general_dilated` unchanged.
`config.model.impl` "auto" uses it on CPU only (`registry.layers_for`): GPUs and TPUs have fast kernel
gradients of their own. The
parameters, their names and their shapes are `nn.Conv`'s (`Conv` is `nn.Conv` with this function),
so checkpoints and parameter counts do not change; the result equals `lax`'s up to float summation
order, or Winograd's rounding (about 3e-6 relative; tests check values and gradients).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from attn_jax.fast import winograd

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _explicit_padding(shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                      padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(shape, kernel, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _windows(x, kernel_shape, strides, padding):
    """The input window each kernel tap sees: kh * kw arrays [B, Ho, Wo, C], row-major taps."""
    kh, kw = kernel_shape
    (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, padding
    x = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    return [x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """NHWC x HWIO convolution with explicit padding: [B, H, W, C], [kh, kw, C, O] -> [B, Ho, Wo, O]."""
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and not any(sum(padding, ())):
        return x @ kernel[0, 0]
    return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    kh, kw, channels, features = kernel.shape
    rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
    dy_rows = dy.reshape(rows, features)
    if (kh, kw) == (1, 1) and strides == (1, 1) and not any(sum(padding, ())):
        dx = dy @ kernel[0, 0].T
        dkernel = (x.reshape(rows, channels).T @ dy_rows)[None, None]
    else:
        transpose = jax.linear_transpose(lambda x: _conv(x, kernel, strides, padding),
                                         jax.ShapeDtypeStruct(x.shape, x.dtype))
        (dx,) = transpose(dy)
        taps = [w.reshape(rows, channels).T @ dy_rows
                for w in _windows(x, (kh, kw), strides, padding)]
        dkernel = jnp.stack(taps).reshape(kh, kw, channels, features)
    return dx, dkernel.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`'s signature; the plain NHWC/HWIO case goes through `conv2d`."""
    plain = (lhs.ndim == 4 and dimension_numbers == _NHWC
             and feature_group_count == 1 and batch_group_count == 1
             and precision is None and preferred_element_type is None
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1))))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    if _winograd_applies(lhs, rhs, strides, pads):
        return winograd.conv3x3(lhs, rhs)
    return conv2d(lhs, rhs, strides, pads)


def _winograd_applies(x, kernel, strides, padding) -> bool:
    """A float32 SAME 3x3 convolution of stride 1: Winograd's F(4x4, 3x3) does it with 4x fewer
    multiplies (`winograd.py`; docs/performance.md#winograds-f4x4-3x3-convolution)."""
    return (kernel.shape[:2] == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
            and x.dtype == jnp.float32 and kernel.dtype == jnp.float32)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)  # nn.Conv, same params
