"""The tutorial PatchConvNet: exact parameter count, shapes, attention map."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import load_experiment

from attn_jax import summary, train


def test_parameter_count_matches_the_tutorial():
    config = load_experiment("patch_convnet")
    model = train.create_model(config, config.dataset.num_classes)
    assert summary.total_params(model, (48, 48, 3)) == 2_174_986


def test_summary_names_every_module_and_the_total():
    config = load_experiment("patch_convnet")
    text = summary.format_summary(train.create_model(config, 10), (48, 48, 3))
    assert text.splitlines()[-1] == "total params: 2,174,986"
    for module in ("ConvStem_0", "TrunkBlock_1", "AttentionPooling_0", "head"):
        assert module in text
    flops = float(text.split("multiply-add = 2): ")[1].split()[0])
    assert 0.4 < flops < 0.7  # about a third of the 1.51 GFLOP training step in the notes


def test_shapes_and_attention_map():
    config = load_experiment("patch_convnet")
    config.model.dim = 32
    model = train.create_model(config, 10)
    images = jax.random.uniform(jax.random.key(0), (3, 48, 48, 3))
    variables = model.init(jax.random.key(1), images, train=False)
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
    model = train.create_model(config, 10)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(1), images, train=False)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply(variables, images, train=False)[0]
    eval_b = apply(variables, images, train=False)[0]
    train_a = apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})[0]
    train_b = apply(variables, images, train=True, rngs={"dropout": jax.random.key(3)})[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)
