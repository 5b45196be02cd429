"""The paper's PatchConvNet (models/patch_convnet.py): sizes, costs, behaviour, decay mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from initialisers import check_initialisers, torch_conv_bound

from attn_jax import model_stats
from attn_jax.models import patch_convnet as pc
from attn_jax.optimizer import decay_mask
from attn_jax.registry import get_model

IMAGE = (224, 224, 3)
# Published (Touvron et al. 2021, table of the paper): params (M) and GFLOPs (multiply-adds).
PUBLISHED = {"S60": (25.2, 4.0), "S120": (47.7, 7.5), "B60": (99.4, 15.8), "B120": (188.6, 29.9)}
WIDTH = {"S": 384, "B": 768, "L": 1024}


def analytic_params(dim: int, depth: int, num_classes: int = 1000) -> int:
    """Parameter count of the official architecture, written out by hand (4-conv stem)."""
    widths = [3, dim // 8, dim // 4, dim // 2, dim]
    stem = sum(9 * a * b for a, b in zip(widths, widths[1:], strict=False))
    r = dim // 4
    block = (2 * dim  # LayerNorm
             + dim * dim + dim  # 1x1 conv
             + 9 * dim + dim  # depthwise 3x3 conv
             + dim * r + r + r * dim + dim  # squeeze-excite
             + dim * dim + dim  # 1x1 conv
             + dim)  # layer-scale
    pooling = (dim  # class token
               + 2 * dim + 4 * (dim * dim + dim)  # norm1, q, k, v, proj
               + 2 * dim + 3 * dim * dim + 3 * dim + 3 * dim * dim + dim  # norm2, MLP
               + 2 * dim)  # two layer-scales
    return stem + depth * block + pooling + 2 * dim + dim * num_classes + num_classes


def tiny(**overrides):
    """The S60 preset shrunk (dim 32, depth 2, two stem convs): 32x32 inputs -> 8x8 = 64 patches."""
    fields = dict(num_classes=10, drop_path_rate=0.0, attention_dropout=0.0, dim=32, depth=2,
                  stem_convs=2)
    return get_model("S60", **{**fields, **overrides})


def images(batch=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, key, *, train):
    return model.apply(variables, x, train=train, rngs={"dropout": key})


def apply(model, variables, x, *, train, rng=0):
    """One compilation per (model, train): the rng is an argument, not a constant."""
    return _apply(model, variables, x, jax.random.key(rng), train=train)


@pytest.fixture(scope="module")
def variables():
    # One initialisation shared by the tests: compiling the initialisers dominates their run time
    # (an "rbg" key compiles about twice as fast as the default threefry on CPU).
    model = tiny()
    key = jax.random.key(0, impl="rbg")
    return jax.jit(functools.partial(model.init, train=False))(key, images(1))


@pytest.mark.parametrize("name", ["S60", "S120", "B60", "B120", "L60", "L120"])
def test_variant_params_and_flops(name):
    model = get_model(name, num_classes=1000, drop_path_rate=0.1, attention_dropout=0.0)
    variables = model_stats.abstract_variables(model, IMAGE)  # ShapeDtypeStructs only
    params = model_stats.count_params(variables["params"])
    assert params == analytic_params(WIDTH[name[0]], int(name[1:]))
    if name in PUBLISHED:
        million, gflops = PUBLISHED[name]
        assert params / 1e6 == pytest.approx(million, rel=0.01)
        assert model_stats.forward_macs(model, variables, IMAGE) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_shapes_and_attention_sums_to_one(variables):
    logits, attention = apply(tiny(), variables, images(), train=False)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert attention.shape == (4, 64)  # 32 / 2^2 = 8 -> 8 x 8 patches
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert bool(jnp.all(attention >= 0))


def test_stem_pads_like_pytorch():
    stem = pc.ConvStem(dim=1, num_convs=1)
    variables = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 3, 1))}}}
    out = stem.apply(variables, jnp.ones((1, 4, 4, 3)))
    assert out.shape == (1, 2, 2, 1)
    # padding 1 on both sides: the top-left output sees a 2x2 window, "SAME" would see 3x3.
    assert float(out[0, 0, 0, 0]) == 2 * 2 * 3
    assert float(out[0, 1, 1, 0]) == 3 * 3 * 3


def test_drop_path_only_in_training(variables):
    # Layer-scales set to 1 so that the residual branches (and dropping them) matter.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.ones_like(leaf) if path[-1].key == "layer_scale" else leaf,
        variables)
    model = tiny(drop_path_rate=0.5)
    x = images()
    eval_a, _ = apply(model, variables, x, train=False, rng=1)
    eval_b, _ = apply(model, variables, x, train=False, rng=2)
    np.testing.assert_array_equal(eval_a, eval_b)
    one, _ = apply(model, variables, x, train=True, rng=1)
    two, _ = apply(model, variables, x, train=True, rng=2)
    again, _ = apply(model, variables, x, train=True, rng=1)
    assert not np.allclose(one, two)
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, eval_a)
    # Without drop-path (and no attention dropout) training and evaluation agree.
    out_train, _ = apply(tiny(), variables, x, train=True, rng=1)
    np.testing.assert_allclose(out_train, eval_a, rtol=1e-6, atol=1e-6)


def test_layer_scale_init(variables):
    # Values on the shrunk S60 (1e-4); the other presets' field abstractly (1e-6).
    scales = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
              if path[-1].key == "layer_scale"]
    assert len(scales) == 2 + 2  # one per trunk block, two in the class-attention block
    for leaf in scales:
        np.testing.assert_allclose(leaf, 1e-4, rtol=1e-6)
    expected = {"S60": 1e-4, "S120": 1e-6, "B60": 1e-6, "B120": 1e-6, "L60": 1e-6, "L120": 1e-6}
    for name, value in expected.items():
        model = get_model(name, num_classes=10, drop_path_rate=0.0, attention_dropout=0.0)
        assert model.layer_scale_init == value
        assert model.stem_convs == 4 and model.mlp_ratio == 3.0


def official_init(keys, shape, parent):
    """The official code's initialiser of each parameter (S60: layer-scale 1e-4)."""
    name = keys[-1]
    if name == "layer_scale":
        return "constant", 1e-4
    if "scale" in parent:  # LayerNorm: weight 1, bias 0
        return "constant", 1.0 if name == "scale" else 0.0
    if name == "cls_token":  # trunc_normal_(std=.02) with absolute bounds +-2: normal(0.02)
        return "normal", 0.02
    if len(parent["kernel"].shape) == 4:  # nn.Conv2d's default, kernel and bias alike
        return "uniform", torch_conv_bound(parent["kernel"].shape)
    return ("normal", 0.02) if name == "kernel" else ("constant", 0.0)  # nn.Linear: _init_weights


def test_initialisers_match_the_official_code(variables):
    ratios = check_initialisers(variables["params"], official_init)
    assert set(ratios) == {"normal", "uniform"}
    print(f"measured std / official std: {ratios}")


def test_decay_mask(variables):
    params = variables["params"]
    mask = decay_mask(params, ("cls_token", "layer_scale"))
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = {"/".join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["pooling/cls_token"] is False
    assert flat["block_0/LayerScale_0/layer_scale"] is False
    assert flat["pooling/gamma_1/layer_scale"] is False
    assert flat["pooling/gamma_2/layer_scale"] is False
    assert flat["block_1/depthwise/kernel"] is True
    assert flat["stem/Conv_0/kernel"] is True
    assert flat["head/kernel"] is True
    assert flat["head/bias"] is True
    assert sum(not v for v in flat.values()) == 1 + 4  # cls_token and the four layer-scales
    vectors = decay_mask(params, ("cls_token",), exclude_vectors=True)
    assert vectors["head"]["bias"] is False and vectors["head"]["kernel"] is True
    assert vectors["pooling"]["cls_token"] is False
    optax.adamw(1e-3, weight_decay=0.05, mask=mask).init(params)  # usable as an optax mask
