"""attn_jax/model_stats.py and the paper-family CIFAR experiment, all abstract (no weights, no data);
`--mode=summary` of the S60 ImageNet experiment is in test_modes.py."""

import jax
import jax.numpy as jnp
import pytest
from conftest import load_experiment

from attn_jax import model_stats, registry
from attn_jax.registry import get_model

XLA_LINE = "forward FLOPs per image (XLA cost analysis: all ops, multiply-add = 2): "
PAPER_LINE = "forward FLOPs per image (paper convention: multiply-adds of convs and matmuls): "


def _value(text: str, prefix: str) -> float:
    """The number (in G) of the summary line starting with `prefix`."""
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return float(line[len(prefix):].split()[0])


def test_format_summary_prints_both_flop_conventions():
    model = get_model("patch_convnet", num_classes=10, dim=16, depth=1, stem_convs=2,
                      layer_scale_init=1e-6, drop_path_rate=0.0, mlp_ratio=3.0,
                      attention_dropout=0.0)
    image = (32, 32, 3)
    text = model_stats.format_summary(model, image)
    variables = model_stats.abstract_variables(model, image)
    xla, paper = _value(text, XLA_LINE), _value(text, PAPER_LINE)
    assert paper == pytest.approx(model_stats.forward_macs(model, variables, image) / 1e9, rel=1e-3)
    assert xla == pytest.approx(model_stats.forward_flops(model, variables, image) / 1e9, rel=1e-3)
    assert xla > paper > 0  # XLA: 2 per multiply-add, and element-wise ops on top
    assert text.splitlines()[-1] == f"total params: {model_stats.count_params(variables['params']):,}"


@pytest.mark.parametrize("arg, patches", [(None, 8 * 8), ("smoke", 4 * 4)])
def test_paper_cifar_experiment_builds(arg, patches):
    config = load_experiment("patch_convnet_paper_cifar", arg)
    assert config.model.name == "patch_convnet"
    model = registry.create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    assert model_stats.total_params(model, (size, size, 3)) > 0
    variables = model_stats.abstract_variables(model, (size, size, 3))
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits, attention = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, 10)
    assert attention.shape == (2, patches)


def _patch_convnet_tutorial_macs(size=48, d=256, depth=2, se_ratio=8, classes=10) -> int:
    """Multiply-adds of the tutorial PatchConvNet's forward pass, layer by layer."""
    stem = (size // 2) ** 2 * (d // 2) * 3 * 3 * 3 + (size // 4) ** 2 * d * 3 * 3 * (d // 2)
    n = (size // 4) ** 2  # patches
    block = n * d * d + n * d * 9 * d + 2 * d * (d // se_ratio) + n * d * d
    pooling = (d * d + 2 * (n + 1) * d * d  # q from the class token, k and v from [cls; patches]
               + 2 * (n + 1) * d  # scores and the weighted sum
               + d * d + 2 * d * d)  # output projection, class MLP
    return stem + depth * block + pooling + d * classes


def _eanet_macs(attention: str, size=32, p=2, d=64, mlp=64, heads=4, coef=4, blocks=8,
                classes=100) -> int:
    """Multiply-adds of the EANet tutorial's model or its ViT baseline, in the reference form."""
    n = (size // p) ** 2
    if attention == "external":  # expand, M_k and M_v over heads*coef heads, out
        inner, h = d * coef, heads * coef
        slots = d // coef
        attend = n * d * inner + 2 * n * h * (inner // h) * slots + n * inner * d
    else:  # q, k, v to [heads, d], scores, weighted sum, out
        attend = 3 * n * d * heads * d + 2 * heads * n * n * d + n * heads * d * d
    return n * p * p * 3 * d + blocks * (attend + 2 * n * d * mlp) + d * classes


@pytest.mark.parametrize("name, expected", [
    ("patch_convnet", _patch_convnet_tutorial_macs()),
    ("eanet", _eanet_macs("external")),
    ("vit", _eanet_macs("self")),
])
def test_tutorial_models_count_exactly_their_multiply_adds(name, expected):
    """The paper-convention count is exact: every conv and matmul of the reference form, no more."""
    config = load_experiment(name)
    model = registry.create_model(config, config.dataset.num_classes, impl="reference")
    image = (config.preprocess.size, config.preprocess.size, 3)
    variables = model_stats.abstract_variables(model, image)
    assert model_stats.forward_macs(model, variables, image) == expected


def test_mac_counter_counts_full_kernels_and_matmuls():
    def f(x, w, a, b):
        y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), feature_group_count=2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y, jax.jit(jnp.dot)(a, b)

    shapes = [(1, 8, 8, 4), (3, 3, 2, 6), (5, 7), (7, 3)]
    jaxpr = jax.make_jaxpr(f)(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    assert model_stats._jaxpr_macs(jaxpr.jaxpr) == 4 * 4 * 6 * (9 * 2) + 5 * 7 * 3
