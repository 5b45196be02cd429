"""Each speed layer of `attn_jax.fast` computes its reference layer: the same parameters (names,
shapes and initial values), outputs and gradients, in training with dropout, and whole models built
with config.model.impl = "fast" equal the reference ones.

The fast attentions compute a few examples at a time; the tests force that split
(`CHUNK_BYTES` = 1: one example per chunk per device) so the chunked path is the one compared.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_experiment

from attn_jax import fast, registry
from attn_jax.fast import attention as fast_attention
from attn_jax.fast import chunking
from attn_jax.models import eanet, patch_convnet_tutorial

close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5)


def close_to_scale(got, want):
    """Equal within 2e-5 of the array's largest magnitude: Winograd's rounding (the fast layers'
    float32 SAME 3x3 convolutions, `attn_jax/fast/winograd.py`) scales with the array's values, so
    an element near zero may differ by more than 2e-5 of itself."""
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(float(np.abs(want).max()), 1))


@pytest.fixture
def in_chunks(monkeypatch):
    """Every fast attention split into the most chunks (one example per device in each)."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1)


def assert_same_function(reference: nn.Module, candidate: nn.Module, x: jax.Array, compare=close,
                         **call):
    """Same parameters from the same key; same output and same gradients (parameters and input)
    in training, with dropout (equal by `compare`); and the dropout did drop something.

    Each computation is jitted: one compile of the whole model costs a fraction of running it
    eagerly, one compile per operation."""
    params, candidate_params = (
        jax.jit(functools.partial(module.init, **call, **_mode(module, train=False)))(
            jax.random.key(1), x)["params"]
        for module in (reference, candidate))
    assert jax.tree.structure(candidate_params) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, candidate_params, params)

    def loss(module, params, x, train=True):
        y = module.apply({"params": params}, x, **call, **_mode(module, train),
                         rngs={"dropout": jax.random.key(2)})
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(jnp.sin(y)), y

    expected = jax.jit(jax.value_and_grad(functools.partial(loss, reference), argnums=(0, 1),
                                          has_aux=True))(params, x)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, candidate), argnums=(0, 1),
                                     has_aux=True))(params, x)
    jax.tree.map(compare, got, expected)
    without_dropout = jax.jit(functools.partial(loss, reference, train=False))(params, x)[1]
    assert np.abs(expected[0][1] - without_dropout).max() > 1e-3  # dropout was applied


def _mode(module: nn.Module, train: bool) -> dict:
    """Flax's attention takes `deterministic`, attn_jax's layers `train`."""
    if isinstance(module, nn.MultiHeadDotProductAttention):
        return {"deterministic": not train}
    return {"train": train}


@pytest.mark.parametrize("slots, folded", [(5, True), (32, False)])
def test_external_attention(in_chunks, slots, folded):
    """The tutorial's S = 16 is folded (cheaper), the paper's S = 64 not: both orders are checked."""
    assert fast_attention.fold_memories(8, 4, 4, slots) == folded
    fields = dict(num_heads=2, dim_coefficient=2, memory_slots=slots, attention_dropout=0.3,
                  projection_dropout=0.2)
    x = jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 9, 8))
    assert chunking.num_chunks(len(x), 4 * 9 * 4 * slots) == 2
    assert_same_function(eanet.ExternalAttention(**fields), fast.ExternalAttention(**fields), x,)


def test_chunked_dot_product_attention(in_chunks):
    """The ViT baseline's self-attention with `attention_fn` swapped: flax's layer either way."""
    layer = functools.partial(eanet.self_attention, num_heads=2, dim=8, attention_dropout=0.3,
                              dtype=jnp.float32, name=None)
    x = jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 6, 8))
    assert_same_function(layer(attention_fn=nn.dot_product_attention),
                         layer(attention_fn=fast.chunked_dot_product_attention), x)


@pytest.mark.parametrize("chunks", [1, 2])  # 1: no checkpoint; 2: the backward recomputes
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: exp(logits) would overflow float32
def test_softmax_equals_jax_softmax(chunks, scale):
    """`fast.attention.softmax` (in `map_in_chunks`, as the attentions use it): jax.nn.softmax's
    values and gradients, over either axis, and finite for large logits."""
    logits = scale * jax.random.normal(jax.random.key(0), (2 * jax.device_count(), 5, 7))
    weights = jax.random.normal(jax.random.key(1), logits.shape)
    for axis in (1, -1):
        def loss(softmax, logits, axis=axis):
            chunked = chunking.map_in_chunks(lambda x: softmax(x, axis=axis), chunks, logits)
            return jnp.sum(weights * chunked)

        got = jax.value_and_grad(functools.partial(loss, fast_attention.softmax))(logits)
        expected = jax.value_and_grad(functools.partial(loss, jax.nn.softmax))(logits)
        assert np.all(np.isfinite(got[1])) and np.abs(expected[1]).max() > 1e-2  # not all ~0
        jax.tree.map(close, got, expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_query_key_scores_equal_the_matmul(dtype):
    """`fast.attention.query_key_scores`: q k^T's values and both gradients, in the inputs' dtype,
    for a batch of heads with more keys than queries (so a swapped axis would not fit)."""
    q, k, g = (jax.random.normal(jax.random.key(i), shape).astype(dtype)
               for i, shape in enumerate([(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 5, 7)]))
    got, got_vjp = jax.vjp(fast_attention.query_key_scores, q, k)
    expected, expected_vjp = jax.vjp(lambda q, k: q @ k.swapaxes(-1, -2), q, k)
    assert got.dtype == dtype and got.shape == (2, 3, 5, 7)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for a, b in zip((got, *got_vjp(g)), (expected, *expected_vjp(g)), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32),
                                   rtol=tolerance, atol=tolerance)


def test_softmax_of_bfloat16_is_computed_in_float32():
    """bfloat16 logits: the weights (returned in bfloat16) are float32's, rounded once."""
    logits = (40 + 3 * jax.random.normal(jax.random.key(0), (4, 64))).astype(jnp.bfloat16)
    got = fast_attention.softmax(logits, axis=-1)
    assert got.dtype == jnp.bfloat16
    expected = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(got.astype(jnp.float32), expected, rtol=1e-2, atol=1e-6)


def test_chunked_backward_keeps_only_the_log_sum_exp(in_chunks, capsys):
    """What the chunked attention keeps for its backward pass: its inputs and the softmax's
    log-sum-exp per query ([.., N, 1]), never the [.., N, N] weights."""
    batch, tokens, heads, dim = 2 * jax.device_count(), 6, 2, 4
    q = jax.random.normal(jax.random.key(0), (batch, tokens, heads, dim))

    def loss(q):
        return jnp.sum(fast.chunked_dot_product_attention(q, q, q, deterministic=True))

    jax.ad_checkpoint.print_saved_residuals(loss, q)  # lines like "f32[8,1,2,6,1] output of ..."
    shapes = [tuple(int(n) for n in dims.split(",")) for dims in
              re.findall(r"^\w+\[([\d,]+)\]", capsys.readouterr().out, re.MULTILINE)]
    assert len(shapes) == 4  # q, k, v and the log-sum-exp
    statistics = [s for s in shapes if s[-1] == 1]
    assert statistics and all(s[-2:] == (tokens, 1) for s in statistics)
    assert not any(s[-2:] == (tokens, tokens) for s in shapes)


def test_chunked_attention_refuses_a_broadcast_dropout_mask():
    q = jnp.ones((2, 3, 1, 4))
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        fast.chunked_dot_product_attention(q, q, q, dropout_rng=jax.random.key(0),
                                           dropout_rate=0.5, broadcast_dropout=True)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((1, 1), 1, "SAME"),  # a plain matmul
    ((3, 3), 1, "SAME"),  # the trunk's 3x3
    ((3, 3), 2, "SAME"),  # the stem's strided 3x3 (asymmetric SAME padding)
    ((2, 2), 2, "VALID"),  # a patchify
    ((3, 3), 1, ((2, 0), (1, 1))),  # explicit padding
    ((3, 3), 2, ((1, 1), (1, 1))),  # the paper's stem (PyTorch padding)
])
def test_conv(kernel, strides, padding):
    class Convs(nn.Module):  # the layer under test, with a dropout so the helper's check applies
        conv: type

        @nn.compact
        def __call__(self, x, *, train):
            y = self.conv(4, kernel, strides=strides, padding=padding)(x)
            return nn.Dropout(0.5)(y, deterministic=not train)

    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    winograd = kernel == (3, 3) and strides == 1 and padding == "SAME"
    assert_same_function(Convs(nn.Conv), Convs(fast.Conv), x,
                         compare=close_to_scale if winograd else close)


def test_gelu_equals_the_exact_gelu():
    """`fast.gelu` (erf) against `nn.gelu(approximate=False)` (erfc, as tf.nn.gelu): values within
    1e-6 in absolute value on [-1000, 1000], the far negative tail included, and derivatives
    within 3e-7 on [-10, 10]."""
    exact = functools.partial(nn.gelu, approximate=False)
    x = jnp.linspace(-1000, 1000, 400_001, dtype=jnp.float32)
    np.testing.assert_allclose(fast.gelu(x), exact(x), rtol=0, atol=1e-6)
    x = jnp.linspace(-10, 10, 200_001, dtype=jnp.float32)
    np.testing.assert_allclose(jax.vmap(jax.grad(fast.gelu))(x), jax.vmap(jax.grad(exact))(x),
                               rtol=0, atol=3e-7)
    assert fast.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_folded_class_attention():
    """The tutorial's attention pooling with the key and value projections folded: same
    parameters; same outputs (pooled class token and attention map) and gradients with dropout,
    at random parameters (at initialisation the class token and biases are zero, and the key's
    gradient with them)."""
    make = functools.partial(patch_convnet_tutorial.AttentionPooling, attention_dropout=0.3,
                             mlp_dropout=0.0)
    reference, candidate = make(), make(class_attention=fast.folded_class_attention)
    x = jax.random.normal(jax.random.key(0), (3, 7, 8))
    params, candidate_params = (jax.jit(functools.partial(module.init, train=False))(
        jax.random.key(1), x)["params"] for module in (reference, candidate))
    jax.tree.map(np.testing.assert_array_equal, candidate_params, params)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [leaf + 0.5 * jax.random.normal(k, leaf.shape)
                                       for leaf, k in zip(leaves, keys, strict=True)])

    def loss(module, params, x):
        cls, attention = module.apply({"params": params}, x, train=True,
                                      rngs={"dropout": jax.random.key(3)})
        return jnp.sum(jnp.sin(cls)) + jnp.sum(jnp.cos(7 * attention)), (cls, attention)

    expected, got = (jax.jit(jax.value_and_grad(functools.partial(loss, module), (0, 1),
                                                has_aux=True))(params, x)
                     for module in (reference, candidate))
    jax.tree.map(close, got, expected)
    assert np.abs(expected[1][0]["key"]["kernel"]).max() > 1e-3  # the key's gradient is tested
    undropped = jax.jit(functools.partial(reference.apply, train=False))({"params": params}, x)[0]
    assert np.abs(expected[0][1][0] - undropped).max() > 1e-3  # dropout was applied

    # computed in bfloat16: equal within its rounding (8 bits of mantissa)
    want, got = (jax.jit(functools.partial(make(dtype=jnp.bfloat16, class_attention=attention)
                                           .apply, train=False))({"params": params}, x)[0]
                 for attention in (patch_convnet_tutorial.reference_class_attention,
                                   fast.folded_class_attention))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * float(np.abs(want).max()))


TUTORIAL_MODELS = {  # experiment -> overrides that make it tiny
    "patch_convnet": dict(dim=16),
    "eanet": dict(dim=8, mlp_dim=8, num_blocks=2, num_heads=2),
    "vit": dict(dim=8, mlp_dim=8, num_blocks=2, num_heads=2),
}


@pytest.mark.parametrize("name", TUTORIAL_MODELS)
def test_tutorial_models_fast_equals_reference(in_chunks, name):
    config = load_experiment(name)
    config.model.update(TUTORIAL_MODELS[name])
    size = 16
    reference, candidate = (registry.create_model(config, 10, impl=impl)
                            for impl in ("reference", "fast"))
    x = jax.random.uniform(jax.random.key(0), (jax.device_count(), size, size, 3))
    assert_same_function(reference, candidate, x,  # the tutorial trunk's 3x3 is Winograd's
                         compare=close_to_scale if name == "patch_convnet" else close)


def test_paper_model_fast_equals_reference():
    config = load_experiment("patch_convnet_paper_cifar")
    config.model.update(dim=16, depth=2, drop_path_rate=0.5, attention_dropout=0.3,
                        layer_scale_init=0.5)  # so the dropouts show
    reference, candidate = (registry.create_model(config, 10, impl=impl)
                            for impl in ("reference", "fast"))
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    assert_same_function(reference, candidate, x)
