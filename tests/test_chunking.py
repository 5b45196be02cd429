"""Attention computed in chunks of examples (CPU): the same function, values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import benchmark, summary
from attn_jax.models import chunking, eanet


def per_example(a, b, c):
    """A function that treats examples independently and has a nonlinear backward pass."""
    return jnp.tanh(a @ b.swapaxes(-1, -2)) @ c


def test_chunk_count_fits_the_budget():
    if jax.default_backend() != "cpu":
        pytest.skip("chunking is CPU-only; elsewhere num_chunks is always 1")
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


def test_self_attention_matches_keras_multi_head_attention():
    """Without dropout: Keras' MultiHeadAttention(4, key_dim=dim) computed head by head."""
    layer = eanet.SelfAttention(num_heads=2, attention_dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    params = layer.init(jax.random.key(1), x, train=False)["params"]
    params = jax.tree.map(lambda p: p + 0.05, params)  # non-zero biases
    heads = []
    for h in range(2):
        q, k, v = (x @ params[n]["kernel"][:, h] + params[n]["bias"][h]
                   for n in ("query", "key", "value"))
        weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(8), axis=-1)
        heads.append(weights @ v @ params["out"]["kernel"][h])
    expected = sum(heads) + params["out"]["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, x, train=False), expected,
                               atol=1e-5)


LAYERS = {
    "self": (eanet.SelfAttention(num_heads=2, attention_dropout=0.5), (2, 6, 6)),
    "external": (eanet.ExternalAttention(num_heads=2, dim_coefficient=2, memory_slots=5,
                                         attention_dropout=0.5, projection_dropout=0.0), (6, 4, 5)),
}


@pytest.mark.parametrize("attention", LAYERS)
def test_attention_in_chunks_is_the_same_with_dropout(monkeypatch, attention):
    """Forced into chunks of one example per device, training output and gradients do not change:
    the dropout mask is drawn for the whole batch before the split."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunking is CPU-only")
    layer, per_example_shape = LAYERS[attention]
    batch = 2 * jax.device_count()  # two examples per device
    x = jax.random.normal(jax.random.key(0), (batch, 6, 8))
    params = layer.init(jax.random.key(1), x, train=False)["params"]

    def loss(params, train=True):
        y = layer.apply({"params": params}, x, train=train, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jnp.sin(y)), y

    whole = jax.value_and_grad(loss, has_aux=True)(params)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1)
    assert chunking.num_chunks(batch, 4 * np.prod(per_example_shape)) == 2
    chunked = jax.value_and_grad(loss, has_aux=True)(params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
                 chunked, whole)
    without_dropout = loss(params, train=False)[1]
    assert np.abs(whole[0][1] - without_dropout).max() > 0.1  # the mask was applied


def test_benchmark_counts_a_chunked_step_by_its_whole_batch_form(monkeypatch):
    """XLA's cost analysis counts a loop's body once; the benchmark recompiles without the loop."""
    if jax.default_backend() != "cpu":
        pytest.skip("chunking is CPU-only")
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1)
    x = jax.random.normal(jax.random.key(0), (jax.device_count() * 4, 3, 5, 4))

    def step(x):
        return chunking.map_in_chunks(per_example, chunking.num_chunks(len(x), 1), x, x, x)

    def compile_step():  # a fresh jit traces with the current chunking
        return jax.jit(lambda x: step(x)).lower(x).compile()

    chunked = compile_step()
    with chunking.whole_batch():
        whole = compile_step()
    assert " while(" in chunked.as_text() and " while(" not in whole.as_text()
    assert summary.cost_flops(chunked) < summary.cost_flops(whole) / 2  # the body, once
    assert benchmark.xla_flops(chunked, 1, lambda: whole) == summary.cost_flops(whole)
    assert benchmark.xla_flops(whole, 1, pytest.fail) == summary.cost_flops(whole)
