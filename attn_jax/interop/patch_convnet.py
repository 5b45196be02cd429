"""The official PatchConvNet `state_dict` <-> attn_jax's `patch_convnet` parameters.

The official model is `PatchConvnet` of facebookresearch/deit's `patchconvnet_models.py` (S60,
S120, B60, B120, L60, L120); its `state_dict` keys, in the order PyTorch writes them, and where
each lives in attn_jax's tree (`attn_jax.models.patch_convnet`), for `depth` trunk blocks `i` and
`s` stem convs `j` (S60: d = 384, depth 60, s = 4, stem widths d/8, d/4, d/2, d):

With B = `blocks.{i}.`, Q = `B attn.qkv_pos.`, T = `blocks_token_only.0.`, b = `block_{i}/`,
p = `pooling/`; "w, b" is a layer's `.weight` and `.bias` (attn_jax: `kernel` and `bias`, or a
LayerNorm's `scale` and `bias`):

| official key | official shape | attn_jax path | conversion |
|---|---|---|---|
| `cls_token` | [1, 1, d] | p `cls_token` | as is |
| `patch_embed.proj.{2j}.0.weight` | [w_j, w_j-1, 3, 3] | `stem/Conv_{j}/kernel` | OIHW -> HWIO |
| B `gamma_1` | [d] | b `LayerScale_0/layer_scale` | as is |
| B `norm1` w, b | [d] | b `LayerNorm_0` | as is |
| Q `0` w, b | [d, d, 1, 1], [d] | b `Conv_0` | OIHW -> HWIO |
| Q `2` w, b | [d, 1, 3, 3], [d] | b `depthwise` | OIHW -> HWIO |
| Q `4.conv_reduce` w, b | [d/4, d, 1, 1], [d/4] | b `SqueezeExcite_0/reduce` | OIHW -> HWIO |
| Q `4.conv_expand` w, b | [d, d/4, 1, 1], [d] | b `SqueezeExcite_0/expand` | OIHW -> HWIO |
| Q `5` w, b | [d, d, 1, 1], [d] | b `Conv_1` | OIHW -> HWIO |
| T `gamma_1`, T `gamma_2` | [d] | p `gamma_1/layer_scale`, p `gamma_2/layer_scale` | as is |
| T `norm1` w, b | [d] | p `norm1` | as is |
| T `attn.q`, `attn.k`, `attn.v` w, b | [d, d], [d] | p `query`, `key`, `value` | transposed |
| T `attn.proj` w, b | [d, d], [d] | p `proj` | transposed |
| T `norm2` w, b | [d] | p `norm2` | as is |
| T `mlp.fc1` w, b | [3d, d], [3d] | p `fc1` | transposed |
| T `mlp.fc2` w, b | [d, 3d], [d] | p `fc2` | transposed |
| `norm` w, b | [d] | `norm` | as is |
| `head` w, b | [classes, d], [classes] | `head` | transposed |

(The stem's convs have no bias; the trunk's `qkv_pos` indices skip its GELUs, 1 and 3; S60 has
1 + 4 + 60 x 13 + 18 + 4 = 807 tensors.) A key of the file that the table lacks, a key of the table that the
file lacks, or a tensor whose shape does not fit the config's model is a `UserError` naming the key;
`to_params` returns nothing partial.
"""

from collections.abc import Mapping

import jax
import numpy as np

from attn_jax.errors import UserError

CONV, LINEAR, SAME = "OIHW -> HWIO", "transposed", "as is"


def _to_attn_jax(array: np.ndarray, conversion: str) -> np.ndarray:
    if conversion == CONV:
        return np.transpose(array, (2, 3, 1, 0))
    return array.T if conversion == LINEAR else array


def _to_official(array: np.ndarray, conversion: str) -> np.ndarray:
    if conversion == CONV:
        return np.transpose(array, (3, 2, 0, 1))
    return array.T if conversion == LINEAR else array


def _with_bias(key: str, path: tuple[str, ...], conversion: str, kernel: str = "kernel"):
    """The rows of a layer with a weight and a bias."""
    return [(f"{key}.weight", (*path, kernel), conversion), (f"{key}.bias", (*path, "bias"), SAME)]


def _layer_norm(key: str, path: tuple[str, ...]):
    return _with_bias(key, path, SAME, kernel="scale")


def key_table(depth: int, stem_convs: int) -> list[tuple[str, tuple[str, ...], str]]:
    """(official key, attn_jax parameter path, conversion) for every tensor, in PyTorch's order."""
    rows = [("cls_token", ("pooling", "cls_token"), SAME)]
    rows += [(f"patch_embed.proj.{2 * j}.0.weight", ("stem", f"Conv_{j}", "kernel"), CONV)
             for j in range(stem_convs)]
    for i in range(depth):
        key, path = f"blocks.{i}", (f"block_{i}",)
        conv = f"{key}.attn.qkv_pos"
        rows += [(f"{key}.gamma_1", (*path, "LayerScale_0", "layer_scale"), SAME),
                 *_layer_norm(f"{key}.norm1", (*path, "LayerNorm_0")),
                 *_with_bias(f"{conv}.0", (*path, "Conv_0"), CONV),
                 *_with_bias(f"{conv}.2", (*path, "depthwise"), CONV),
                 *_with_bias(f"{conv}.4.conv_reduce", (*path, "SqueezeExcite_0", "reduce"), CONV),
                 *_with_bias(f"{conv}.4.conv_expand", (*path, "SqueezeExcite_0", "expand"), CONV),
                 *_with_bias(f"{conv}.5", (*path, "Conv_1"), CONV)]
    token = "blocks_token_only.0"
    rows += [(f"{token}.gamma_1", ("pooling", "gamma_1", "layer_scale"), SAME),
             (f"{token}.gamma_2", ("pooling", "gamma_2", "layer_scale"), SAME),
             *_layer_norm(f"{token}.norm1", ("pooling", "norm1")),
             *_with_bias(f"{token}.attn.q", ("pooling", "query"), LINEAR),
             *_with_bias(f"{token}.attn.k", ("pooling", "key"), LINEAR),
             *_with_bias(f"{token}.attn.v", ("pooling", "value"), LINEAR),
             *_with_bias(f"{token}.attn.proj", ("pooling", "proj"), LINEAR),
             *_layer_norm(f"{token}.norm2", ("pooling", "norm2")),
             *_with_bias(f"{token}.mlp.fc1", ("pooling", "fc1"), LINEAR),
             *_with_bias(f"{token}.mlp.fc2", ("pooling", "fc2"), LINEAR),
             *_layer_norm("norm", ("norm",)),
             *_with_bias("head", ("head",), LINEAR)]
    return rows


def _paths(params) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return {tuple(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def table_for(params) -> list[tuple[str, tuple[str, ...], str]]:
    """`key_table` for the model whose parameter tree (arrays or shapes) is `params`; a model that
    is not a paper-family PatchConvNet is a `UserError`."""
    paths = _paths(params)
    depth = sum(1 for p in paths if p[0].startswith("block_") and p[1:] == ("Conv_0", "kernel"))
    stem_convs = sum(1 for p in paths if p[0] == "stem")
    table = key_table(depth, stem_convs)
    if not depth or {path for _, path, _ in table} != set(paths):
        raise UserError("official PatchConvNet weights fit the paper's PatchConvNet only: use a "
                        "config whose config.model.name is patch_convnet or a preset such as S60 "
                        "(not the tutorial's patch_convnet_tutorial)")
    return table


def _official_shape(shape: tuple[int, ...], conversion: str) -> tuple[int, ...]:
    return _to_official(np.empty(shape, np.bool_), conversion).shape


def to_params(state_dict: Mapping[str, np.ndarray], params, source: str = "the weights"):
    """The official `state_dict` as a parameter tree shaped like `params` (arrays or shapes, whose
    dtypes are kept). Every key must map and every shape fit: else one `UserError` naming the first
    offending key (and how many there are), nothing returned."""
    table = table_for(params)
    expected = _paths(params)
    problems = [f"it has {k!r}, which the config's model lacks" for k in state_dict
                if k not in {key for key, _, _ in table}]
    problems += [f"it lacks {key!r}" for key, _, _ in table if key not in state_dict]
    for key, path, conversion in table:
        want = _official_shape(tuple(expected[path].shape), conversion)
        if key in state_dict and tuple(state_dict[key].shape) != want:
            problems.append(f"{key!r} has shape {tuple(state_dict[key].shape)} where the config's "
                            f"model needs {want}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{source} do not fit the config's PatchConvNet: {problems[0]}{more}: "
                        "check config.model (the variant, depth and dim) and "
                        "config.dataset.num_classes (the head) against the file")
    tree: dict = {}
    for key, path, conversion in table:
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        array = _to_attn_jax(np.asarray(state_dict[key]), conversion)
        node[path[-1]] = np.ascontiguousarray(array, dtype=expected[path].dtype)
    return tree


def to_state_dict(params) -> dict[str, np.ndarray]:
    """attn_jax `patch_convnet` parameters -> the official `state_dict` ({key: float32 array} in
    PyTorch's order), which `PatchConvnet.load_state_dict` accepts."""
    leaves = _paths(params)
    return {key: np.ascontiguousarray(_to_official(np.asarray(leaves[path], np.float32), conversion))
            for key, path, conversion in table_for(params)}
