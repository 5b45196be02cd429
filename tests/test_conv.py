"""The CPU-friendly convolution (models/conv.py) and the unrolled threefry hash (train.py): both
must compute exactly what they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import train  # noqa: F401  (registers the unrolled threefry lowering on CPU)
from attn_jax.models.conv import Conv


@pytest.mark.parametrize("kernel,strides,padding", [
    ((1, 1), 1, "SAME"),  # a plain matmul
    ((3, 3), 1, "SAME"),  # the trunk's 3x3
    ((3, 3), 2, "SAME"),  # the stem's strided 3x3 (asymmetric SAME padding)
    ((2, 2), 2, "VALID"),  # a patchify
    ((3, 3), 1, ((2, 0), (1, 1))),  # explicit padding
])
def test_conv_matches_flax_conv_values_and_gradients(kernel, strides, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    ours = Conv(4, kernel, strides=strides, padding=padding)
    reference = nn.Conv(4, kernel, strides=strides, padding=padding)
    params = reference.init(jax.random.key(1), x)
    # Same parameter names and shapes: checkpoints and parameter counts are unchanged.
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    ours_grads = jax.grad(loss, argnums=(1, 2))(ours, params, x)
    reference_grads = jax.grad(loss, argnums=(1, 2))(reference, params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_routes_only_the_plain_case():
    """Grouped (depthwise) convolutions go to lax unchanged: the jaxpr has no custom VJP."""
    x = jnp.ones((1, 4, 4, 6))
    depthwise = Conv(6, (3, 3), feature_group_count=6)
    params = depthwise.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda p: depthwise.apply(p, x))(params))
    assert "custom_vjp" not in jaxpr and "feature_group_count=6" in jaxpr
    plain = Conv(6, (3, 3))
    jaxpr = str(jax.make_jaxpr(lambda p: plain.apply(p, x))(plain.init(jax.random.key(0), x)))
    assert "custom_vjp" in jaxpr


# Threefry-2x32 (20 rounds) known-answer vectors of Random123 (Salmon et al., SC 2011), as JAX's
# own tests use them: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key,counter,expected", KNOWN_ANSWERS)
def test_unrolled_threefry_gives_the_published_bits(key, counter, expected):
    from jax.extend.random import threefry_2x32

    assert jax.default_backend() == "cpu"  # the lowering under test is the CPU one
    out = jax.jit(threefry_2x32)(jnp.asarray(key, jnp.uint32), jnp.asarray(counter, jnp.uint32))
    assert tuple(int(v) for v in out) == expected


def test_unrolled_threefry_lowering_has_no_loop():
    from jax.extend.random import threefry_2x32

    hlo = jax.jit(threefry_2x32).lower(jnp.zeros(2, jnp.uint32), jnp.zeros(64, jnp.uint32)).as_text()
    assert "while" not in hlo and "stablehlo.while" not in hlo
