"""Computing in chunks of examples (`attn_jax/fast/chunking.py`): how many chunks, how a sharded
batch is split, and the same values and gradients as the whole batch. The fast attentions built on
it are compared with their references in test_fast_equivalence.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.fast import chunking


def per_example(a, b, c):
    """A function that treats examples independently and has a nonlinear backward pass."""
    return jnp.tanh(a @ b.swapaxes(-1, -2)) @ c


def test_chunk_count_fits_the_budget():
    unit = chunking.CHUNK_BYTES // 16
    assert chunking.num_chunks(128, unit, devices=1) == 8  # 16 examples fill the budget
    assert chunking.num_chunks(128, unit, devices=8) == 1  # 16 per device already fit
    assert chunking.num_chunks(120, 3 * unit, devices=1) == 24  # fewest dividing chunks: 5 each
    assert chunking.num_chunks(12, 64 * unit, devices=1) == 12  # too big even alone: one each
    assert chunking.num_chunks(12, unit, devices=8) == 1  # batch does not divide: left whole


@pytest.mark.parametrize("devices", [1, 2])
def test_split_keeps_each_devices_share_within_a_chunk(devices):
    x = jnp.arange(16)
    split = chunking._split(x, 4, devices)  # 4 chunks of 4
    np.testing.assert_array_equal(chunking._merge(split, devices), x)
    first = np.asarray(split[0])
    halves = [first[first < 8], first[first >= 8]]
    assert sorted(map(len, halves)) == ([0, 4] if devices == 1 else [2, 2])


@pytest.mark.parametrize("devices", [1, 2])
def test_chunked_equals_whole_batch_with_gradients(devices):
    keys = jax.random.split(jax.random.key(0), 3)
    a, b, c = (jax.random.normal(k, (8, 3, 5, 4)) for k in keys)

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))

    whole = jax.value_and_grad(functools.partial(loss, per_example), argnums=(0, 1, 2))(a, b, c)
    chunked_fn = functools.partial(chunking.map_in_chunks, per_example, 4, devices=devices)
    chunked = jax.value_and_grad(functools.partial(loss, chunked_fn), argnums=(0, 1, 2))(a, b, c)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
                 chunked, whole)
