"""Keras' default initialisers, for the models built as the Keras tutorials built them."""

import flax.linen as nn
import jax
import jax.numpy as jnp

glorot = nn.initializers.xavier_uniform()  # Keras' default kernel initialiser (GlorotUniform)


def keras_glorot(kernel_shape: tuple[int, ...]):
    """Glorot-uniform with the fans Keras gives a kernel of `kernel_shape`, for `nn.DenseGeneral`
    (which hands its initialiser the kernel flattened to a matrix).

    Keras takes a rank-3 kernel for a conv kernel: MultiHeadAttention's query [d, heads, key_dim]
    gets fan_in = heads * d and fan_out = key_dim * d (Flax's `xavier_uniform` on the full shape
    computes the same), so with one head of key_dim d its std is sqrt(2 / (d + d^2)), not the
    matrix's sqrt(1 / d): 11x smaller at d = 256. That is what the tutorials ran with (tf.keras;
    recent Keras 3, e.g. 3.15.1, gives EinsumDense's initialiser the input and output axes instead).
    """
    def init(key, shape, dtype=jnp.float32):
        return glorot(key, kernel_shape, dtype).reshape(shape)

    return init


def keras_embedding_init(key, shape, dtype=jnp.float32):
    """Keras `Embedding`'s default initialiser: uniform in [-0.05, 0.05)."""
    return jax.random.uniform(key, shape, dtype, minval=-0.05, maxval=0.05)
