"""The unrolled threefry lowering (`attn_jax/fast/threefry.py`, installed by the conftest as by
launch.py): the same bits as JAX's own, without a loop."""

import jax
import jax.numpy as jnp
import pytest

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
