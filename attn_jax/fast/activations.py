"""Exact GELU through `erf`: `gelu`, for the erfc form of `tf.nn.gelu` and `nn.gelu(approximate=False)`.

GELU(x) = x * Phi(x), Phi the standard normal CDF. TensorFlow (the tutorials' backend) and JAX write
it as 0.5 x erfc(-x / sqrt 2), which keeps Phi's relative precision far into the negative tail; here it
is 0.5 x (1 + erf(x / sqrt 2)), the same function in exact arithmetic. XLA:CPU evaluates `erf` as one
clamped rational polynomial and `erfc` as two with an `exp` and a select, and the derivative by
autodiff of the erfc form keeps that `exp` as a residual.

Rounding: the two forms differ by less than 1e-6 in absolute value (values, measured on
[-1000, 1000]) and 3e-7 (derivatives, on [-10, 10]): a test checks both. Where GELU is tiny (x below
about -5), the erf form keeps that absolute accuracy but not the relative one of the erfc form:
1 + erf(x / sqrt 2) cancels to the float32 spacing near 1, so it returns 0 or a value off by a
few 1e-7, which no later sum notices.

Why here: the tutorial PatchConvNet applies GELU to about 260,000 activations per image in its
stem and trunk, and XLA:CPU's fusions of the erf form cost a fraction of the erfc form's
(docs/performance.md#the-tutorial-patchconvnets-pooling-gelu-and-winograd-on-zen-5).
"""

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), element-wise; any shape, same dtype."""
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
