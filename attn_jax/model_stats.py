"""Model size and cost, computed abstractly (no weights are allocated): parameter counts and forward
FLOPs, which `--mode=summary` prints (`format_summary`), a run logs (`total_params`) and the
benchmark's MFU counts (`cost_flops`, `forward_macs`)."""

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


def _trace_forward(model: nn.Module, variables, image_shape: tuple[int, int, int], batch: int):
    """`jax.jit(model.apply)` traced on `jax.ShapeDtypeStruct`s (eval mode): nothing is allocated."""
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)

    def forward(v, x):
        return model.apply(v, x, train=False)

    return jax.jit(forward).trace(variables, images)


def cost_flops(stage) -> float:
    """FLOPs of a lowered or compiled JAX program by XLA's cost analysis (0 if it has none)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returns one dict per computation
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


def forward_flops(model: nn.Module, variables, image_shape: tuple[int, int, int],
                  batch: int = 1) -> float:
    """XLA's cost-analysis FLOPs of one eval forward pass, per image.

    XLA counts a multiply-add as 2 FLOPs and counts every op, element-wise ones included (an exact
    GELU costs it 66 FLOPs per element); the papers' convention is `forward_macs`.
    """
    return cost_flops(_trace_forward(model, variables, image_shape, batch).lower()) / batch


def forward_macs(model: nn.Module, variables, image_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of the convolutions and matmuls of one eval forward pass, per image.

    The papers' "FLOPs" convention (fvcore / ptflops style): every conv counts its full kernel at
    every output position (padding included) and every matmul its full product; element-wise work
    (GELU, LayerNorm, softmax, biases) is not counted. Computed from the jaxpr of `model.apply` on
    `jax.ShapeDtypeStruct`s, so nothing is allocated. (XLA's cost analysis, `forward_flops`,
    counts element-wise ops too: an exact GELU alone costs it 66 FLOPs per element.)
    """
    return _jaxpr_macs(_trace_forward(model, variables, image_shape, 1).jaxpr.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
    """Conv and dot_general multiply-adds of a jaxpr, recursing into sub-jaxprs (scan x length)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out_size = math.prod(eqn.outvars[0].aval.shape)
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += out_size * math.prod(lhs_shape[i] for i in lhs_contract)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += out_size * (math.prod(kernel) // out_features)
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    total += repeat * _jaxpr_macs(sub)
    return total


def format_summary(model: nn.Module, image_shape: tuple[int, int, int]) -> str:
    """The parameter table per module, forward FLOPs per image in both conventions (XLA's cost
    analysis and the papers' multiply-adds of convs and matmuls), the model's `summary_notes()` if
    it has them, and the total, as printable text."""
    variables = abstract_variables(model, image_shape)
    params = variables["params"]
    rows = param_table(params)
    width = max(len(name) for name, _ in rows)
    lines = [f"{'module':<{width}}  {'params':>12}"]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in rows]
    traced = _trace_forward(model, variables, image_shape, 1)  # one trace for both counts
    flops = cost_flops(traced.lower())
    macs = _jaxpr_macs(traced.jaxpr.jaxpr)
    lines.append(f"input: {'x'.join(map(str, image_shape))}")
    lines.append("forward FLOPs per image (XLA cost analysis: all ops, multiply-add = 2): "
                 f"{flops / 1e9:.4g} G")
    lines.append("forward FLOPs per image (paper convention: multiply-adds of convs and matmuls): "
                 f"{macs / 1e9:.4g} G")
    lines += getattr(model, "summary_notes", list)()  # e.g. a shared block applied several times
    lines.append(f"total params: {count_params(params):,}")
    return "\n".join(lines)


def total_params(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Trainable parameter count of `model` at `image_shape`, computed abstractly."""
    return count_params(abstract_variables(model, image_shape)["params"])


