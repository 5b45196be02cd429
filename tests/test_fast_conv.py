"""The CPU-friendly convolution (`attn_jax/fast/conv.py`): only the plain case is rerouted, and a
float32 SAME 3x3 of stride 1 goes through Winograd's F(4x4, 3x3) (`attn_jax/fast/winograd.py`).
That `Conv` computes `nn.Conv`'s values and gradients is in test_fast_equivalence.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from attn_jax.fast import Conv, winograd


def _jaxpr(conv: Conv, x: jax.Array) -> str:
    return str(jax.make_jaxpr(lambda p: conv.apply(p, x))(conv.init(jax.random.key(0), x)))


def test_conv_routes_only_the_plain_case():
    """Grouped (depthwise) convolutions go to lax unchanged: the jaxpr has no custom VJP."""
    x = jnp.ones((1, 4, 4, 6))
    jaxpr = _jaxpr(Conv(6, (3, 3), feature_group_count=6), x)
    assert "custom_vjp" not in jaxpr and "feature_group_count=6" in jaxpr
    assert "name=conv2d" in _jaxpr(Conv(6, (3, 3), strides=2), x)


WINOGRAD = "name=_conv3x3_with_winograd_gradients"  # conv3x3's custom VJP in a jaxpr


def test_only_float32_same_3x3_of_stride_1_goes_through_winograd():
    x = jnp.ones((1, 8, 8, 6))
    jaxpr = _jaxpr(Conv(6, (3, 3)), x)
    assert "conv_general_dilated" not in jaxpr and WINOGRAD in jaxpr  # Winograd's dots
    explicit = _jaxpr(Conv(6, (3, 3), padding=((1, 1), [1, 1])), x)
    assert "conv_general_dilated" not in explicit and WINOGRAD in explicit  # SAME spelled out
    for other in (Conv(6, (3, 3), strides=2), Conv(6, (3, 3), padding="VALID"),
                  Conv(6, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)):
        jaxpr = _jaxpr(other, x.astype(other.dtype or jnp.float32))
        assert "name=conv2d" in jaxpr and WINOGRAD not in jaxpr


def _direct(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape", [(2, 12, 12, 16), (3, 7, 10, 5), (1, 1, 2, 3)])
def test_winograd_equals_the_direct_convolution_with_both_gradients(shape):
    """Values and gradients within float32 Winograd rounding (relative 2e-5) of lax's convolution,
    for whole tiles (the trunk's 12x12) and sizes padded up to them."""
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 8)) / 3
    probe = jax.random.normal(jax.random.key(2), (*shape[:3], 8))

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel)) * probe)

    for got, want in zip(jax.value_and_grad(functools.partial(loss, winograd.conv3x3),
                                            argnums=(0, 1))(x, kernel),
                         jax.value_and_grad(functools.partial(loss, _direct),
                                            argnums=(0, 1))(x, kernel), strict=True):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(
            g, w, rtol=0, atol=2e-5 * float(jnp.abs(w).max())), got, want)
    np.testing.assert_allclose(winograd.conv3x3(x, kernel), _direct(x, kernel), rtol=0,
                               atol=2e-5 * float(jnp.abs(_direct(x, kernel)).max()))


def test_winograd_takes_under_a_third_of_the_direct_convolutions_flops():
    """What it is for, by XLA's cost analysis of the trunk's shape (batch 8): 36 multiplies per
    4x4 output tile against 9 x 16 (a quarter), plus the transforms (0.31 in all)."""
    x, kernel = jnp.ones((8, 12, 12, 256)), jnp.ones((3, 3, 256, 256))

    def flops(conv):
        return jax.jit(conv).lower(x, kernel).compile().cost_analysis()["flops"]

    assert flops(winograd.conv3x3) < flops(_direct) / 3
