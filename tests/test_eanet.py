"""EANet (the tutorial's external attention and ViT baseline) and the tutorial's augmentations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_experiment
from initialisers import check_initialisers, keras_glorot_bound

from attn_jax import augment
from attn_jax.errors import UserError
from attn_jax.models import eanet, get_model
from attn_jax.summary import abstract_variables, total_params

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


@pytest.mark.parametrize("slots, folded", [(5, True), (32, False)])
def test_external_attention_matches_tutorial_layout(slots, folded):
    """Both computation orders give what the tutorial's [B, heads, N, hd] layout gives."""
    heads, head_dim, inner = 4, 4, 16  # dim 8, 2 heads x coefficient 2
    assert eanet.fold_memories(8, heads, head_dim, slots) == folded
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


@pytest.mark.parametrize("attention", ["external", "self"])
def test_output_shapes(attention):
    model = eanet.EANet(**{**TINY, "attention": attention})
    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))
    variables = model.init(jax.random.key(1), images, train=False)
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
    variables = model.init(jax.random.key(1), images, train=False)

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
    with pytest.raises(UserError, match="attention"):
        eanet.EANet(**{**TINY, "attention": "linear"})
    with pytest.raises(UserError, match="num_heads"):
        eanet.EANet(**{**TINY, "num_heads": 3})


# Augmentations, on one raw-pixel image.

IMAGE = jax.random.uniform(jax.random.key(7), (12, 10, 3), maxval=255.0)
KEY = jax.random.key(11)


def test_zero_factors_are_identity():
    np.testing.assert_array_equal(augment.random_rotation(IMAGE, KEY, 0.0), IMAGE)
    np.testing.assert_array_equal(augment.random_zoom(IMAGE, KEY, 0.0, 0.0), IMAGE)
    np.testing.assert_array_equal(augment.random_contrast(IMAGE, KEY, 0.0), IMAGE)
    # The math itself is exact at angle 0, zoom 1 (no short-circuit there).
    np.testing.assert_array_equal(augment.rotate(IMAGE, jnp.float32(0)), IMAGE)
    np.testing.assert_array_equal(augment.zoom(IMAGE, jnp.float32(1), jnp.float32(1)), IMAGE)


def test_flip_twice_is_identity():
    once = augment.random_flip(IMAGE, KEY)
    np.testing.assert_array_equal(augment.random_flip(once, KEY), IMAGE)


def test_rotation_of_constant_image_stays_constant():
    constant = jnp.full((12, 10, 3), 200.0)
    rotated = augment.rotate(constant, jnp.float32(np.deg2rad(30)))  # corners fall outside
    np.testing.assert_allclose(rotated, 200.0, rtol=1e-5)
    np.testing.assert_allclose(augment.random_rotation(constant, KEY, 0.1), 200.0, rtol=1e-5)


def test_rotation_by_180_degrees_flips_both_axes():
    np.testing.assert_allclose(augment.rotate(IMAGE, jnp.float32(np.pi)), IMAGE[::-1, ::-1],
                               atol=1e-3)


def test_contrast_stays_in_pixel_range():
    for seed in range(3):
        out = augment.random_contrast(IMAGE, jax.random.key(seed), 0.9)
        assert out.shape == IMAGE.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
        assert not np.allclose(out, IMAGE)


def test_zoom_changes_image_and_keeps_shape():
    out = augment.random_zoom(IMAGE, KEY, 0.2, 0.2)
    assert out.shape == IMAGE.shape
    assert not np.allclose(out, IMAGE)
    # zoom out by 2 about the centre: the centre pixel stays, its neighbour reads two pixels away
    odd = jax.random.uniform(KEY, (9, 9, 3), maxval=255.0)
    zoomed = augment.zoom(odd, jnp.float32(2), jnp.float32(2))
    np.testing.assert_allclose(zoomed[4, 4], odd[4, 4], rtol=1e-6)
    np.testing.assert_allclose(zoomed[4, 5], odd[4, 6], rtol=1e-6)
