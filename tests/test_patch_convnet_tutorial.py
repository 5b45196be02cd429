"""The tutorial PatchConvNet: exact parameter counts (tied and untied trunk), shapes, attention map."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_experiment, tutorial_trunk_config
from initialisers import check_initialisers, keras_glorot_bound

from attn_jax import model_stats, modes, registry


def test_the_experiment_builds_the_tied_trunk_the_tutorial_trained():
    config = load_experiment("patch_convnet")
    assert config.model.tie_trunk is True


@pytest.mark.parametrize("tie_trunk, expected", [(True, 1_436_426), (False, 2_174_986)])
def test_parameter_count_matches_the_tutorial(tie_trunk, expected):
    config = load_experiment("patch_convnet")
    config.model.tie_trunk = tie_trunk
    model = registry.create_model(config, config.dataset.num_classes)
    assert model_stats.total_params(model, (48, 48, 3)) == expected


def test_summary_names_every_module_and_the_total(capsys):
    modes.summarize(load_experiment("patch_convnet"))  # what --mode=summary prints
    text = capsys.readouterr().out.strip()
    lines = text.splitlines()
    assert lines[-1] == "total params: 1,436,426"
    assert lines[-2] == ("trunk: one shared block, TrunkBlock_shared, applied 2 times "
                         "(tie_trunk=True, as the tutorial's code)")
    for module in ("ConvStem_0", "TrunkBlock_shared/Conv_1", "AttentionPooling_0", "head"):
        assert module in text
    assert "TrunkBlock_0" not in text
    paper = text.split("multiply-adds of convs and matmuls): ")[1].split()[0]
    assert paper == "0.2715"  # 271,453,184 multiply-adds, counted layer by layer in test_model_stats.py


def test_summary_of_the_untied_trunk():
    config = load_experiment("patch_convnet")
    config.model.tie_trunk = False
    tied_text = model_stats.format_summary(registry.create_model(load_experiment("patch_convnet"), 10),
                                       (48, 48, 3))
    text = model_stats.format_summary(registry.create_model(config, 10), (48, 48, 3))
    assert text.splitlines()[-1] == "total params: 2,174,986"
    assert text.splitlines()[-2] == "trunk: 2 independent blocks (tie_trunk=False)"
    assert "TrunkBlock_1/Conv_1" in text and "TrunkBlock_shared" not in text
    flops = [line for line in text.splitlines() if line.startswith("forward FLOPs")]
    assert flops == [line for line in tied_text.splitlines() if line.startswith("forward FLOPs")]


def test_untied_parameter_tree_is_unchanged_and_tied_has_one_block():
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    untied = registry.create_model(tutorial_trunk_config(False, depth=3), 10)
    tied = registry.create_model(tutorial_trunk_config(True, depth=3), 10)
    untied_params = jax.eval_shape(lambda x: untied.init(jax.random.key(0), x, train=False),
                                   images)["params"]
    tied_params = jax.eval_shape(lambda x: tied.init(jax.random.key(0), x, train=False),
                                 images)["params"]
    assert sorted(untied_params) == ["AttentionPooling_0", "ConvStem_0", "TrunkBlock_0",
                                     "TrunkBlock_1", "TrunkBlock_2", "head"]
    assert sorted(tied_params) == ["AttentionPooling_0", "ConvStem_0", "TrunkBlock_shared", "head"]
    block = jax.tree.map(lambda x: x.shape, tied_params["TrunkBlock_shared"])
    assert all(jax.tree.map(lambda x: x.shape, untied_params[f"TrunkBlock_{i}"]) == block
               for i in range(3))


@pytest.mark.slow  # three models' compilations: 12 s
def test_tied_trunk_is_the_untied_one_with_every_block_equal():
    """The tied model computes exactly the untied model whose blocks all hold the shared weights."""
    tied, untied = (registry.create_model(tutorial_trunk_config(t), 10) for t in (True, False))
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    params = tied.init(jax.random.key(1), images, train=False)["params"]
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)
    untied_params = {k: v for k, v in params.items() if k != "TrunkBlock_shared"}
    untied_params.update(TrunkBlock_0=params["TrunkBlock_shared"],
                         TrunkBlock_1=params["TrunkBlock_shared"])
    logits, attention = tied.apply({"params": params}, images, train=False)
    expected_logits, expected_attention = untied.apply({"params": untied_params}, images,
                                                       train=False)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attention, expected_attention, rtol=1e-6, atol=1e-7)
    # Gradients of the shared block are the sum over its two applications.
    def loss(p, model):
        return jnp.sum(model.apply({"params": p}, images, train=False)[0] ** 2)

    tied_grad = jax.grad(loss)(params, tied)["TrunkBlock_shared"]
    untied_grads = jax.grad(loss)(untied_params, untied)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(tied_grad)[0],
        jax.flatten_util.ravel_pytree(jax.tree.map(jnp.add, untied_grads["TrunkBlock_0"],
                                                   untied_grads["TrunkBlock_1"]))[0],
        rtol=1e-4, atol=1e-6)


def test_shapes_and_attention_map():
    config = load_experiment("patch_convnet")
    config.model.dim = 32
    model = registry.create_model(config, 10)
    images = jax.random.uniform(jax.random.key(0), (3, 48, 48, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
    # Randomise the zero-initialised class token so the attention is not uniform.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(2), x.shape)
        if "cls_token" in jax.tree_util.keystr(p) else x, variables["params"])
    logits, attention = jax.jit(model.apply, static_argnames="train")(
        {"params": params}, images, train=False)
    assert logits.shape == (3, 10)
    assert attention.shape == (3, 144)  # 48 / 4 = 12 -> 12 x 12 patches
    np.testing.assert_allclose(jnp.sum(attention, axis=-1), 1.0, rtol=1e-5)
    assert jnp.all(attention >= 0)
    assert not jnp.allclose(attention[0], attention[1])  # depends on the image


def test_dropout_only_in_training():
    config = load_experiment("patch_convnet")
    config.model.dim = 16
    model = registry.create_model(config, 10)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply(variables, images, train=False)[0]
    eval_b = apply(variables, images, train=False)[0]
    train_a = apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})[0]
    train_b = apply(variables, images, train=True, rngs={"dropout": jax.random.key(3)})[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)


def keras_init(keys, shape, parent):
    """The tutorial's (Keras') initialiser of each parameter: Glorot-uniform kernels with Keras'
    fans (MultiHeadAttention's [d, heads, d] projections included), zero biases and class token."""
    if "scale" in parent:  # LayerNormalization: gamma 1, beta 0
        return "constant", 1.0 if keys[-1] == "scale" else 0.0
    if keys[-1] in ("bias", "cls_token"):  # bias_initializer="zeros"; tf.zeros((1, 1, d))
        return "constant", 0.0
    assert keys[-1] == "kernel", keys
    return "uniform", keras_glorot_bound(shape)


@pytest.mark.parametrize("tie_trunk", [True, False])
def test_initialisers_match_keras(tie_trunk):
    config = tutorial_trunk_config(tie_trunk)
    config.model.dim = 32
    model = registry.create_model(config, 10)
    params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))["params"]
    assert check_initialisers(params, keras_init).keys() == {"uniform"}
