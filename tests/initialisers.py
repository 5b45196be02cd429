"""Checks a model's initial parameters, leaf by leaf, against the initialisers of its original.

A test describes the original with `spec(keys, shape, parent) -> (kind, value)`: ("constant", c)
(every value exactly c), ("uniform", bound) (U(-bound, bound): std bound / sqrt(3)) or
("normal", std). `check_initialisers` then asserts, for every leaf, the constant exactly, or the
bound and the standard deviation (about 0, so the mean is checked too) within 5 standard errors
of its own sample size, and once more pooled over all leaves of a kind, where the sample is large
enough to tell, say, a truncated normal of std 0.0176 from a normal of std 0.02.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np

Spec = Callable[[tuple[str, ...], tuple[int, ...], dict], tuple[str, float]]


def keras_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as Keras computes them for a weight of `shape` without explicit axes (TF2
    `tf.keras` and Keras 3 alike): a rank > 2 weight is taken for a conv kernel, the leading axes
    being its receptive field. Keras' EinsumDense (MultiHeadAttention's projections) used this for
    its rank-3 kernels when the tutorials ran; recent Keras 3 (e.g. 3.15.1) passes it the axes."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def keras_glorot_bound(shape: tuple[int, ...]) -> float:
    """The bound of Keras' `GlorotUniform` for a weight of `shape`: sqrt(6 / (fan_in + fan_out))."""
    return math.sqrt(6 / sum(keras_fans(shape)))


def torch_conv_bound(kernel_shape: tuple[int, ...]) -> float:
    """PyTorch nn.Conv2d's default bound, 1 / sqrt(fan_in), for an HWIO kernel (I = in / groups)."""
    return 1 / math.sqrt(math.prod(kernel_shape[:-1]))


def _leaves(tree: dict, keys: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object, dict]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*keys, key))
        else:
            yield (*keys, key), value, tree


def check_initialisers(params: dict, spec: Spec) -> dict[str, float]:
    """Asserts every leaf of `params` against `spec` (see the module docstring); returns, per random
    kind, the pooled measured standard deviation over the expected one (1 when they agree)."""
    pooled: dict[str, list[np.ndarray]] = defaultdict(list)
    for keys, leaf, parent in _leaves(params):
        name = "/".join(keys)
        x = np.asarray(leaf, np.float64).ravel()
        kind, value = spec(keys, tuple(leaf.shape), parent)
        if kind == "constant":  # exactly, in the parameter's dtype
            assert np.all(np.asarray(leaf) == np.asarray(value, leaf.dtype)), f"{name}: not {value}"
            continue
        assert kind in ("uniform", "normal"), f"{name}: unknown kind {kind!r}"
        if kind == "uniform":
            assert np.max(np.abs(x)) <= value * (1 + 1e-6), f"{name}: beyond the bound {value}"
        z = x / (value / math.sqrt(3) if kind == "uniform" else value)  # expected std 1, mean 0
        ratio = math.sqrt(np.mean(z ** 2))
        assert abs(ratio - 1) < 5 / math.sqrt(2 * z.size), f"{name}: std ratio {ratio:.3f}"
        assert abs(np.mean(z)) < 5 / math.sqrt(z.size), f"{name}: mean {np.mean(z):.3f} std"
        pooled[kind].append(z)
    ratios = {}
    for kind, zs in pooled.items():
        z = np.concatenate(zs)
        ratios[kind] = math.sqrt(np.mean(z ** 2))
        assert abs(ratios[kind] - 1) < 5 / math.sqrt(2 * z.size), f"{kind}: std ratio {ratios[kind]}"
        if kind == "normal" and z.size > 1000:  # untruncated: some draws beyond 2.5 std
            assert np.max(np.abs(z)) > 2.5, "the normal draws look truncated"
    return ratios
