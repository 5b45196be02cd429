"""EANet (`attn_jax/models/eanet.py`): the tutorial's external attention and its ViT baseline, and
the two experiments built on them."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_experiment
from initialisers import check_initialisers, keras_glorot_bound

from attn_jax import model_stats, registry
from attn_jax.errors import UserError
from attn_jax.model_stats import abstract_variables, total_params
from attn_jax.models import eanet
from attn_jax.registry import get_model

TUTORIAL = dict(num_classes=100, patch_size=2, dim=64, mlp_dim=64, num_heads=4, dim_coefficient=4,
                num_blocks=8, attention_dropout=0.2, projection_dropout=0.2, attention="external",
                memory_slots=16)
TINY = dict(num_classes=5, patch_size=2, dim=16, mlp_dim=16, num_heads=2, dim_coefficient=2,
            num_blocks=2, attention_dropout=0.2, projection_dropout=0.2, attention="external",
            memory_slots=8)


@pytest.mark.parametrize("attention, expected", [("external", 361_380), ("self", 623_268)])
def test_tutorial_parameter_counts(attention, expected):
    model = get_model("eanet", **{**TUTORIAL, "attention": attention})
    assert total_params(model, (32, 32, 3)) == expected


def test_double_normalization():
    logits = 3 * jax.random.normal(jax.random.key(0), (2, 7, 3, 5))  # [B, N, heads, S]
    after_softmax = eanet.softmax_over_tokens(logits, token_axis=1)
    np.testing.assert_allclose(after_softmax.sum(axis=1), 1, atol=1e-6)  # each slot, over tokens
    weights = eanet.double_normalize(logits, token_axis=1)
    np.testing.assert_allclose(weights.sum(axis=-1), 1, atol=1e-6)  # each token, over slots
    np.testing.assert_allclose(weights, eanet.l1_over_slots(after_softmax), rtol=1e-6)
    assert weights.dtype == jnp.float32


@pytest.mark.parametrize("slots", [5, 32])
def test_external_attention_matches_tutorial_layout(slots):
    """The [B, N, heads, ...] layout computes what the tutorial's [B, heads, N, hd] layout does."""
    heads, head_dim, inner = 4, 4, 16  # dim 8, 2 heads x coefficient 2
    layer = eanet.ExternalAttention(num_heads=2, dim_coefficient=2, memory_slots=slots,
                                    attention_dropout=0.0, projection_dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 9, 8))
    params = layer.init(jax.random.key(1), x, train=False)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases

    def dense(name, t):
        return t @ params[name]["kernel"] + params[name]["bias"]

    y = dense("expand", x).reshape(2, 9, heads, head_dim).transpose(0, 2, 1, 3)
    attn = jax.nn.softmax(dense("memory_key", y), axis=2)
    attn = attn / (1e-9 + attn.sum(-1, keepdims=True))
    y = dense("memory_value", attn).transpose(0, 2, 1, 3).reshape(2, 9, inner)
    expected = dense("out", y)
    np.testing.assert_allclose(layer.apply({"params": params}, x, train=False), expected,
                               atol=1e-5)


def test_self_attention_matches_keras_multi_head_attention():
    """Without dropout: Keras' MultiHeadAttention(2, key_dim=dim) computed head by head."""
    layer = eanet.self_attention(num_heads=2, dim=8, attention_dropout=0.0, dtype=jnp.float32,
                                 attention_fn=nn.dot_product_attention, name=None)
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.05, params)  # non-zero biases
    heads = []
    for h in range(2):
        q, k, v = (x @ params[n]["kernel"][:, h] + params[n]["bias"][h]
                   for n in ("query", "key", "value"))
        weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(8), axis=-1)
        heads.append(weights @ v @ params["out"]["kernel"][h])
    expected = sum(heads) + params["out"]["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["external", "self"])
def test_output_shapes(attention):
    model = eanet.EANet(**{**TINY, "attention": attention})
    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
    logits, attn = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert attn is None
    assert variables["params"]["pos_embed"].shape == (64, 16)


def test_memory_slots_is_one_field():
    params = abstract_variables(eanet.EANet(**{**TINY, "memory_slots": 64}), (16, 16, 3))["params"]
    attention = params["block0"]["attention"]
    head_dim = 16 * 2 // (2 * 2)
    assert attention["memory_key"]["kernel"].shape == (head_dim, 64)
    assert attention["memory_value"]["kernel"].shape == (64, head_dim)


def test_dropout_only_in_training():
    model = eanet.EANet(**TINY)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)

    @jax.jit
    def forward(dropout_rng):
        train = model.apply(variables, images, train=True, rngs={"dropout": dropout_rng})[0]
        return train, model.apply(variables, images, train=False)[0]

    train_a, eval_a = forward(jax.random.key(2))
    train_b, eval_b = forward(jax.random.key(3))
    assert not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, eval_a)


@pytest.mark.parametrize("name", ["eanet", "vit"])
def test_experiments_choose_the_exact_gelu(name):
    assert load_experiment(name).model.gelu_approximate is False  # tf.nn.gelu, as the TF2 run


@pytest.mark.parametrize("approximate", [False, True])
def test_mlp_gelu_variant(approximate):
    """The MLP's GELU is exact (erf) or the tanh approximation, as `gelu_approximate` says."""
    mlp = eanet.Mlp(mlp_dim=32, dropout=0.0, gelu_approximate=approximate)
    x = 2 * jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = mlp.init(jax.random.key(1), x, train=False)["params"]
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    if approximate:  # Keras 3 ops.gelu's default
        h = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    else:  # tf.nn.gelu's default
        h = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
    expected = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    np.testing.assert_allclose(mlp.apply({"params": params}, x, train=False), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["external", "self"])
def test_gelu_variants_share_parameters_and_differ_slightly(attention):
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    exact, tanh = (eanet.EANet(**{**TINY, "attention": attention, "gelu_approximate": a})
                   for a in (False, True))
    assert eanet.EANet(**TINY).gelu_approximate is False  # the default: exact
    variables = exact.init(jax.random.key(1), images, train=False)
    assert (jax.tree.structure(variables) ==
            jax.tree.structure(tanh.init(jax.random.key(1), images, train=False)))
    a = exact.apply(variables, images, train=False)[0]
    b = tanh.apply(variables, images, train=False)[0]
    assert 0 < float(jnp.max(jnp.abs(a - b))) < 1e-2


def keras_init(keys, shape, parent):
    """The tutorial's (Keras') initialiser of each parameter: Glorot-uniform kernels with Keras'
    fans (MultiHeadAttention's [dim, heads, dim] and [heads, dim, dim] kernels included), zero
    biases, and `Embedding`'s uniform(-0.05, 0.05) for the position embedding."""
    if "scale" in parent:  # LayerNormalization: gamma 1, beta 0
        return "constant", 1.0 if keys[-1] == "scale" else 0.0
    if keys[-1] == "pos_embed":
        return "uniform", 0.05
    if keys[-1] == "bias":
        return "constant", 0.0
    assert keys[-1] == "kernel", keys
    return "uniform", keras_glorot_bound(shape)


@pytest.mark.parametrize("attention", ["external", "self"])
def test_initialisers_match_keras(attention):
    model = eanet.EANet(**{**TINY, "attention": attention, "dim": 32, "mlp_dim": 32})
    params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))["params"]
    assert check_initialisers(params, keras_init).keys() == {"uniform"}


def test_bad_config_raises_user_error():
    """The model refuses a bad field with a ValueError; built from a config (the registry), the
    same message is the user's one-line error."""
    with pytest.raises(ValueError, match="attention"):
        eanet.EANet(**{**TINY, "attention": "linear"})
    with pytest.raises(ValueError, match="num_heads"):
        eanet.EANet(**{**TINY, "num_heads": 3})
    with pytest.raises(UserError, match=r"^unknown attention 'linear': set config\.model\.attention "
                                        r"to one of external, self$"):
        get_model("eanet", **{**TINY, "attention": "linear"})
    with pytest.raises(UserError, match=r"^dim 16 is not divisible by num_heads 3: set "
                                        r"config\.model\.dim to a multiple of config\.model\.num_heads$"):
        get_model("eanet", **{**TINY, "num_heads": 3})


@pytest.mark.parametrize("experiment, expected", [("eanet", 361_380), ("vit", 623_268)])
def test_experiment_parameter_counts(experiment, expected):
    config = load_experiment(experiment)
    model = registry.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    assert model_stats.total_params(model, (size, size, 3)) == expected


def test_vit_differs_from_eanet_only_in_attention():
    eanet, vit = load_experiment("eanet").to_dict(), load_experiment("vit").to_dict()
    assert (eanet["model"].pop("attention"), vit["model"].pop("attention")) == ("external", "self")
    assert vit == eanet
