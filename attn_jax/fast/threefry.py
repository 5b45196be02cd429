"""JAX's threefry random-bit hash lowered on CPU without its rolled loop (as JAX does on GPU and TPU).

On CPU JAX runs the hash's 5 round groups as a while loop, to compile faster; each iteration then
passes over every word in memory, which makes a dropout mask cost about as much as a matmul layer.
Unrolled, XLA fuses the whole hash with the comparison and the select into one pass
(docs/performance.md#dropouts-random-bits), and the bits are the same (a test checks the published
known-answer vectors), so every run is unchanged.

Nothing happens on import: `launch.py` (and the tests' conftest) call
`use_unrolled_threefry_on_cpu()` once, before anything is compiled.
"""

import jax.numpy as jnp
import numpy as np


def threefry2x32_unrolled(key1, key2, x1, x2):
    """Threefry-2x32 with its 20 rounds written out: the same bits as JAX's rolled CPU lowering."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (key1, key2, x1, x2)))
    key1, key2, x1, x2 = (jnp.broadcast_to(v, shape) for v in (key1, key2, x1, x2))
    keys = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + keys[(i + 1) % 3]
        x2 = x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return [x1, x2]


def use_unrolled_threefry_on_cpu() -> None:
    """Registers `threefry2x32_unrolled` as the CPU lowering of JAX's threefry primitive. Affects
    only programs compiled afterwards; calling it again changes nothing."""
    from jax.extend.random import threefry2x32_p
    from jax.interpreters import mlir

    mlir.register_lowering(threefry2x32_p,
                           mlir.lower_fun(threefry2x32_unrolled, multiple_results=True),
                           platform="cpu")
