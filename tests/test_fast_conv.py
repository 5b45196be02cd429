"""The CPU-friendly convolution (`attn_jax/fast/conv.py`): only the plain case is rerouted. That it
computes `nn.Conv`'s values and gradients is in test_fast_equivalence.py."""

import jax
import jax.numpy as jnp

from attn_jax.fast import Conv


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
