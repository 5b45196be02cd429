"""Model size and cost, computed abstractly (no weights are allocated): `--mode=summary`."""

import math
from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp


def abstract_variables(model: nn.Module, image_shape: tuple[int, int, int]) -> dict:
    """The model's variables as `jax.ShapeDtypeStruct`s, for an input of `image_shape` (H, W, C)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def count_params(params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def param_table(params, depth: int = 2) -> list[tuple[str, int]]:
    """Parameter counts grouped by the first `depth` levels of the module path, sorted by path."""
    groups: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        groups["/".join(names[: min(depth, len(names) - 1)] or names)] += math.prod(leaf.shape)
    return list(groups.items())


def forward_flops(model: nn.Module, variables, image_shape: tuple[int, int, int],
                  batch: int = 1) -> float:
    """XLA's cost-analysis FLOPs of one eval forward pass, per image.

    XLA counts a multiply-add as 2 FLOPs; papers often count it as 1 (halve this figure).
    """
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)

    def forward(v, x):
        return model.apply(v, x, train=False)

    cost = jax.jit(forward).lower(variables, images).cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returns one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / batch


def format_summary(model: nn.Module, image_shape: tuple[int, int, int]) -> str:
    """The parameter table per module, the total, and forward FLOPs per image, as printable text."""
    variables = abstract_variables(model, image_shape)
    params = variables["params"]
    rows = param_table(params)
    width = max(len(name) for name, _ in rows)
    lines = [f"{'module':<{width}}  {'params':>12}"]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in rows]
    flops = forward_flops(model, variables, image_shape)
    lines.append(f"input: {'x'.join(map(str, image_shape))}")
    lines.append(f"forward FLOPs per image (XLA, multiply-add = 2): {flops / 1e9:.3f} G")
    lines.append(f"forward MACs per image (papers' FLOPs, multiply-add = 1): {flops / 2e9:.3f} G")
    lines.append(f"total params: {count_params(params):,}")
    return "\n".join(lines)


def total_params(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Trainable parameter count of `model` at `image_shape`, computed abstractly."""
    return count_params(abstract_variables(model, image_shape)["params"])


