"""Each tutorial model computes what its Keras original computes.

For the tutorial PatchConvNet (tied and untied trunk), EANet (exact and tanh GELU; memories folded
into the outer Dense layers and not) and the ViT baseline, the test builds the model in Keras 3 from
the tutorial's code (`keras_ports.py`, a port of the text in ../shared/seeds/), gives its biases,
LayerNorm parameters and class token random values (at their zero/one defaults some mix-ups are
invisible), copies every Keras weight into the attn_jax parameter tree (every leaf assigned exactly
once, every Keras weight used once) and compares, on the same preprocessed images:

- in inference mode, the logits (within 1e-5) and, for PatchConvNet, the attention map: Keras returns
  the class token's softmax weights on the patches as they are (they sum to 1 minus its weight on
  itself); attn_jax renormalises them to sum to 1, so the Keras map is renormalised first;
- in training mode with every dropout at 0, the loss and the gradient of every parameter.

Swapping two layers' weights in the attn_jax tree must break the match. Keras runs on its JAX
backend (no TensorFlow needed); without Keras 3 the module is skipped. All dimensions are small.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported

import dataclasses  # noqa: E402
import functools  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import load_experiment  # noqa: E402

keras = pytest.importorskip(
    "keras", reason="Keras 3 is not installed (pip install 'keras>=3'): the comparison of the "
                    "models with the tutorials' Keras code needs it")
if int(keras.__version__.split(".")[0]) < 3 or keras.backend.backend() != "jax":
    pytest.skip(f"needs Keras 3 on its JAX backend, found Keras {keras.__version__} on "
                f"{keras.backend.backend()}", allow_module_level=True)

import keras_ports  # noqa: E402

from attn_jax import model_stats, registry, train  # noqa: E402

NUM_CLASSES = 10
LOGIT_TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Weights: Keras -> attn_jax
# ---------------------------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, jax.Array]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def copy_weights(keras_model, mapping: dict, params: dict) -> dict:
    """`params` with every leaf replaced by the Keras variable `mapping` assigns it. Every leaf must
    be assigned, each Keras trainable variable exactly once, with the same shape."""
    flat = flatten(params)
    assert not mapping.keys() - flat.keys(), f"no such attn_jax leaves: {mapping.keys() - flat.keys()}"
    assert not flat.keys() - mapping.keys(), f"leaves left unassigned: {flat.keys() - mapping.keys()}"
    used = [id(v) for v in mapping.values()]
    assert len(set(used)) == len(used), "a Keras weight is assigned to two leaves"
    keras_vars = {id(v): v.path for v in keras_model.trainable_variables}
    assert len(keras_vars) == len(keras_model.trainable_variables)
    assert set(used) == set(keras_vars), \
        f"Keras weights left out: {[keras_vars[i] for i in set(keras_vars) - set(used)]}"
    copied = {}
    for path, variable in mapping.items():
        value = keras.ops.convert_to_numpy(variable)
        assert value.shape == flat[path].shape, (path, value.shape, flat[path].shape)
        copied[path] = jnp.asarray(value)
    return unflatten(copied)


def randomise(keras_model, seed: int) -> None:
    """Random biases, LayerNorm gammas and betas and class token (kernels keep Keras' init)."""
    rng = np.random.default_rng(seed)
    for v in keras_model.trainable_variables:
        assert v.name in ("kernel", "bias", "gamma", "beta", "cls", "embeddings"), v.path
        if v.name in ("bias", "beta", "cls"):
            v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
        elif v.name == "gamma":
            v.assign((1.0 + rng.normal(0.0, 0.3, v.shape)).astype("float32"))


def _dense(mapping: dict, prefix: str, layer, bias: bool = True) -> None:
    mapping[f"{prefix}/kernel"] = layer.kernel
    if bias:
        mapping[f"{prefix}/bias"] = layer.bias


def _layer_norm(mapping: dict, prefix: str, layer) -> None:
    mapping[f"{prefix}/scale"] = layer.gamma
    mapping[f"{prefix}/bias"] = layer.beta


def patch_convnet_mapping(model, tie: bool) -> dict:
    """attn_jax leaf path -> Keras variable, for the tutorial PatchConvNet."""
    m: dict = {}
    for i, conv in enumerate(model.stem.layers):
        _dense(m, f"ConvStem_0/Conv_{i}", conv)
    blocks = model.trunk.trunk_blocks
    if tie:  # one block's layers in every Sequential
        assert all(b.layers == blocks[0].layers for b in blocks)
        named = {"TrunkBlock_shared": blocks[0]}
    else:
        assert not set(map(id, blocks[0].layers)) & set(map(id, blocks[-1].layers))
        named = {f"TrunkBlock_{i}": block for i, block in enumerate(blocks)}
    for name, block in named.items():
        norm, conv_1x1, conv_3x3, se, conv_out = block.layers
        _layer_norm(m, f"{name}/LayerNorm_0", norm)
        _dense(m, f"{name}/Conv_0", conv_1x1)
        _dense(m, f"{name}/Conv_1", conv_3x3)
        _dense(m, f"{name}/SqueezeExcite_0/reduce", se.reduction, bias=False)
        _dense(m, f"{name}/SqueezeExcite_0/expand", se.excite, bias=False)
        _dense(m, f"{name}/Conv_2", conv_out)
    pool, p = model.attention_pooling, "AttentionPooling_0"
    m[f"{p}/cls_token"] = pool.cls
    for i, norm in enumerate((pool.layer_norm1, pool.layer_norm2, pool.layer_norm3)):
        _layer_norm(m, f"{p}/LayerNorm_{i}", norm)
    for name in ("query", "key", "value"):
        _dense(m, f"{p}/{name}", getattr(pool.attention, f"{name}_dense"))
    _dense(m, f"{p}/out", pool.attention.output_dense)
    _dense(m, f"{p}/Dense_0", pool.mlp.layers[0])
    _dense(m, f"{p}/Dense_1", pool.mlp.layers[2])
    _dense(m, "head", pool.dense)
    return m


def eanet_mapping(record: dict, attention: str) -> dict:
    """attn_jax leaf path -> Keras variable, for EANet ("external") or the ViT baseline ("self")."""
    m: dict = {}
    _dense(m, "patch_embed", record["embedding"].proj)
    m["pos_embed"] = record["embedding"].pos_embed.embeddings
    for i, block in enumerate(record["blocks"]):
        p = f"block{i}"
        _layer_norm(m, f"{p}/LayerNorm_0", block["norm1"])
        _layer_norm(m, f"{p}/LayerNorm_1", block["norm2"])
        if attention == "external":
            for name in ("expand", "memory_key", "memory_value", "out"):
                _dense(m, f"{p}/attention/{name}", block[name])
        else:
            mha = block["attention"]
            for name in ("query", "key", "value"):
                _dense(m, f"{p}/attention/{name}", getattr(mha, f"{name}_dense"))
            _dense(m, f"{p}/attention/out", mha.output_dense)
        _dense(m, f"{p}/Mlp_0/Dense_0", block["mlp"][0])
        _dense(m, f"{p}/Mlp_0/Dense_1", block["mlp"][1])
    _dense(m, "head", record["head"])
    return m


# ---------------------------------------------------------------------------------------------
# The pairs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pair:
    """A Keras model and its attn_jax counterpart holding the same (copied) weights."""

    keras_model: object
    model: object  # the attn_jax module
    mapping: dict  # attn_jax leaf path -> Keras variable
    params: dict
    images: np.ndarray
    labels: np.ndarray
    label_smoothing: float
    swaps: list[tuple[str, str]]  # attn_jax subtrees of equal shapes whose exchange must show
    forward: Callable = None  # jitted attn_jax eval forward (params, images) -> (logits, attn)


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, size, size, 3)).astype("float32")


def _labels(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, 4)


def patch_convnet_pair(tie: bool) -> Pair:
    config = load_experiment("patch_convnet")
    config.model.update(dim=16, depth=2, se_ratio=4, tie_trunk=tie,
                        attention_dropout=0.0, mlp_dropout=0.0)  # dropout 0: gradients compare
    c = config.model
    keras_model = keras_ports.patch_convnet(NUM_CLASSES, c.dim, c.depth, c.se_ratio, tie=tie,
                                            attention_dropout=0.0, mlp_dropout=0.0)
    images = _images(16)  # -> 4 x 4 = 16 patches
    keras_model(images[:1])  # builds the weights
    randomise(keras_model, seed=2)
    model = registry.create_model(config, NUM_CLASSES, impl="reference")  # fast: its own test
    mapping = patch_convnet_mapping(keras_model, tie)
    params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                 images[:1])["params"]
    params = copy_weights(keras_model, mapping, params)
    block = "TrunkBlock_shared" if tie else "TrunkBlock_0"
    swaps = [(f"{block}/Conv_0", f"{block}/Conv_2"),  # the two 1x1 convs
             ("AttentionPooling_0/query", "AttentionPooling_0/key"),
             ("AttentionPooling_0/LayerNorm_1", "AttentionPooling_0/LayerNorm_2")]
    if not tie:
        swaps.append(("TrunkBlock_0", "TrunkBlock_1"))
    return Pair(keras_model, model, mapping, params, images, _labels(),
                config.loss.label_smoothing, swaps)


def eanet_pair(experiment: str, **fields) -> Pair:
    config = load_experiment(experiment)
    config.model.update(dim=16, mlp_dim=16, num_blocks=2, attention_dropout=0.0,
                        projection_dropout=0.0, **fields)
    c = config.model
    config.model.memory_slots = c.dim // c.dim_coefficient  # the tutorial's S
    record: dict = {}
    keras_model = keras_ports.eanet(
        "external_attention" if c.attention == "external" else "self_attention",
        input_shape=(16, 16, 3), num_classes=NUM_CLASSES, patch_size=c.patch_size,
        embedding_dim=c.dim, mlp_dim=c.mlp_dim, num_heads=c.num_heads,
        dim_coefficient=c.dim_coefficient, num_transformer_blocks=c.num_blocks,
        attention_dropout=0.0, projection_dropout=0.0, gelu_approximate=c.gelu_approximate,
        logits=True, record=record)
    randomise(keras_model, seed=3)
    model = registry.create_model(config, NUM_CLASSES, impl="reference")  # fast: its own test
    images = _images(16)  # 2x2 patches -> 64 tokens
    mapping = eanet_mapping(record, c.attention)
    params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                                 images[:1])["params"]
    params = copy_weights(keras_model, mapping, params)
    swaps = [("block0", "block1"), ("block0/LayerNorm_0", "block0/LayerNorm_1"),
             ("block0/Mlp_0/Dense_0", "block0/Mlp_0/Dense_1")]  # mlp_dim = dim
    if c.attention == "self":
        swaps.append(("block0/attention/query", "block0/attention/value"))
    elif mapping["block0/attention/memory_key/kernel"].shape == \
            mapping["block0/attention/memory_value/kernel"].shape:  # head_dim = S
        swaps.append(("block0/attention/memory_key", "block0/attention/memory_value"))
    return Pair(keras_model, model, mapping, params, images, _labels(),
                config.loss.label_smoothing, swaps)


PAIRS = {
    "patch_convnet_tied": lambda: patch_convnet_pair(tie=True),
    "patch_convnet_untied": lambda: patch_convnet_pair(tie=False),
    # 4 heads x coefficient 4: the tutorial's proportions, memories folded into the outer layers.
    "eanet": lambda: eanet_pair("eanet", num_heads=4, dim_coefficient=4),
    # 4 heads x coefficient 2: memories applied as in the tutorial; the Keras 3 text's tanh GELU.
    "eanet_tanh_gelu": lambda: eanet_pair("eanet", num_heads=4, dim_coefficient=2,
                                          gelu_approximate=True),
    "vit": lambda: eanet_pair("vit", num_heads=4),
}


@functools.cache
def build_pair(name: str) -> Pair:
    """The pair `name` of PAIRS, built once per test session."""
    keras.utils.set_random_seed(0)  # Keras' kernel initialisers
    built = PAIRS[name]()
    built.forward = jax.jit(lambda p, x: built.model.apply({"params": p}, x, train=False))
    return built


@pytest.fixture(params=list(PAIRS))
def pair(request) -> Pair:
    return build_pair(request.param)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _keras_eval(pair: Pair):
    """Keras' inference-mode outputs: (logits, attention map renormalised to sum to 1, or None)."""
    out = pair.keras_model(pair.images, training=False)
    if isinstance(out, tuple | list):
        logits, viz = (keras.ops.convert_to_numpy(o) for o in out)
        return logits, viz / viz.sum(axis=-1, keepdims=True)
    return keras.ops.convert_to_numpy(out), None


# ---------------------------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------------------------
def test_logits_and_attention_match_in_inference_mode(pair, request):
    keras_logits, keras_attention = _keras_eval(pair)
    logits, attention = pair.forward(pair.params, pair.images)
    diff = _max_diff(logits, keras_logits)
    print(f"\n{request.node.callspec.id}: max |logit difference| {diff:.2e} "
          f"(logits up to {np.max(np.abs(keras_logits)):.2f})")
    assert np.std(keras_logits) > 0.1  # a non-degenerate comparison
    assert diff < LOGIT_TOL
    assert (attention is None) == (keras_attention is None)
    if attention is not None:
        attention_diff = _max_diff(attention, keras_attention)
        print(f"{request.node.callspec.id}: max |attention difference| {attention_diff:.2e} "
              f"(weights up to {np.max(keras_attention):.3f}, uniform "
              f"{1 / keras_attention.shape[-1]:.3f})")
        assert np.std(keras_attention) > 1e-3  # not uniform
        assert attention_diff < 1e-6


def _keras_loss_and_grads(pair: Pair):
    """Keras' training-mode loss and gradients (stateless, on the JAX backend), keyed by variable."""
    model = pair.keras_model
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                   label_smoothing=pair.label_smoothing)
    targets = jax.nn.one_hot(pair.labels, NUM_CLASSES)

    @jax.jit
    def loss(trainable, images):
        out, _ = model.stateless_call(trainable, non_trainable, images, training=True)
        logits = out[0] if isinstance(out, tuple | list) else out
        return loss_fn(targets, logits)

    value, grads = jax.value_and_grad(loss)(trainable, pair.images)
    return float(value), {id(v): g for v, g in zip(model.trainable_variables, grads, strict=True)}


def test_loss_and_gradients_match_with_dropout_off(pair, request):
    keras_loss, keras_grads = _keras_loss_and_grads(pair)

    @jax.jit
    def loss(params, images, labels):
        logits, _ = pair.model.apply({"params": params}, images, train=True,
                                     rngs={"dropout": jax.random.key(0)})
        return jnp.mean(train.cross_entropy(logits, labels, pair.label_smoothing))

    value, grads = jax.value_and_grad(loss)(pair.params, pair.images, pair.labels)
    name = request.node.callspec.id
    print(f"\n{name}: loss {float(value):.6f} vs Keras {keras_loss:.6f} "
          f"(difference {abs(float(value) - keras_loss):.2e})")
    assert abs(float(value) - keras_loss) < 1e-5
    flat = flatten(grads)
    worst, largest = 0.0, 0.0
    for path, g in flat.items():
        expected = keras_grads[id(pair.mapping[path])]
        scale = float(np.max(np.abs(expected)))
        diff = _max_diff(g, expected)
        worst, largest = max(worst, diff), max(largest, scale)
        assert diff <= 1e-5 * max(1.0, scale), f"{path}: {diff:.2e} (gradient up to {scale:.2e})"
    assert largest > 1e-2  # a non-degenerate comparison
    print(f"{name}: max |gradient difference| {worst:.2e} over {len(flat)} leaves "
          f"(gradients up to {largest:.2e})")


def test_swapping_two_layers_breaks_the_match(pair):
    keras_logits, _ = _keras_eval(pair)
    flat = flatten(pair.params)
    assert pair.swaps
    for first, second in pair.swaps:
        a = {k[len(first):]: v for k, v in flat.items() if k.startswith(first + "/")}
        b = {k[len(second):]: v for k, v in flat.items() if k.startswith(second + "/")}
        assert a and a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape for k in a)
        swapped = dict(flat)
        swapped.update({first + k: v for k, v in b.items()})
        swapped.update({second + k: v for k, v in a.items()})
        logits, _ = pair.forward(unflatten(swapped), pair.images)
        assert _max_diff(logits, keras_logits) > 100 * LOGIT_TOL, (first, second)


def test_the_other_gelu_breaks_the_match():
    """The Keras 3 text's tanh GELU against attn_jax's exact one: the GELU flag is what matches."""
    pair = build_pair("eanet_tanh_gelu")
    keras_logits, _ = _keras_eval(pair)
    exact = pair.model.clone(gelu_approximate=False)
    logits, _ = jax.jit(lambda p, x: exact.apply({"params": p}, x, train=False))(
        pair.params, pair.images)
    assert _max_diff(logits, keras_logits) > 10 * LOGIT_TOL


# ---------------------------------------------------------------------------------------------
# The tutorial-sized ports
# ---------------------------------------------------------------------------------------------
def _count(variables) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.mark.parametrize("tie", [True, False])
def test_tutorial_patch_convnet_parameter_count_equals_the_keras_port(tie):
    config = load_experiment("patch_convnet")
    config.model.tie_trunk = tie
    c = config.model
    keras_model = keras_ports.patch_convnet(10, c.dim, c.depth, c.se_ratio, tie=tie)
    size = config.preprocess.size
    keras_model(keras.KerasTensor((1, size, size, 3)))  # builds the weights, computes nothing
    expected = _count(keras_model.trainable_variables)
    assert model_stats.total_params(registry.create_model(config, 10), (size, size, 3)) == expected
    assert expected == (1_436_426 if tie else 2_174_986)  # docs/faithfulness.md#parameter-counts-and-flops


@pytest.mark.parametrize("experiment, attention", [("eanet", "external_attention"),
                                                   ("vit", "self_attention")])
def test_tutorial_eanet_parameter_count_equals_the_keras_port(experiment, attention):
    config = load_experiment(experiment)
    keras_model = keras_ports.eanet(attention)  # the tutorial's hyper-parameters
    assert model_stats.total_params(registry.create_model(config, 100), (32, 32, 3)) == \
        _count(keras_model.trainable_variables)
