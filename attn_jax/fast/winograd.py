"""A 3x3, stride-1 convolution in Winograd's minimal filtering F(4x4, 3x3): `conv3x3`.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). Each 4x4 tile of the
output is computed from the 6x6 tile of the input around it: the input tile and the 3x3 kernel are
each taken to a 6x6 "Winograd domain" by fixed matrices (`BT`, `G`), multiplied there position by
position and summed over input channels (36 matrix multiplies of [tiles, C] x [C, O]), and brought
back by a third (`AT`). That is 36 multiplies per 16 outputs against the direct convolution's
9 x 16: 4x fewer multiplies (0.31 of the FLOPs with the transforms' adds, by XLA's cost analysis).
Both gradients are Winograd-domain matrix multiplies of the same size, 4x fewer multiplies too,
by a custom VJP (`_conv3x3_bwd`): the input's gradient is the same convolution of the output's
gradient with the kernel turned 180 degrees, and the kernel's is the 36 matmuls of the input's
transform (kept from the forward pass) with the output gradient's, taken back by G^T . G.

It computes the same function as `lax.conv_general_dilated` with SAME padding; only float rounding
differs, and more than the direct convolution's: the transforms' constants (up to 5 and 1/24) scale
intermediate values, giving relative errors of about 3e-6 in float32 (1e-7 direct; cuDNN uses the
same transform in float32). It is for float32: in bfloat16 the error would be far above bfloat16's
own rounding, so `Conv` keeps the direct convolution for other dtypes.

Why here: on CPU the tutorial PatchConvNet's trunk conv (batch 128, 12x12, 256 -> 256, applied
twice per step) takes the largest share of the train step, and XLA:CPU's direct convolution already
runs near the float32 matmul peak, so fewer FLOPs are the way past it
(docs/performance.md#winograds-f4x4-3x3-convolution).

All the transforms are sums of scaled slices (`_combine`), and the input's overlapping tiles are
cut by reshapes and slices (`_windows`), not gathered: XLA:CPU runs those as fused loops, where an
`einsum` becomes 6-long matmuls and transposes and a gather's transpose a scatter-add over a zeroed
buffer. The gradients are a custom VJP because autodiff's transpose of the input transform adds the
overlapping tiles back as chains of pads and adds, the costliest transform left; the VJP has none
(docs/performance.md#winograds-f4x4-3x3-convolution).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TILE = 4  # output tile: F(4x4, 3x3)
# Lavin and Gray's F(4, 3) matrices (interpolation points 0, 1, -1, 2, -2 and infinity)
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], np.float32)  # input tile [6] -> Winograd domain [6]
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], np.float32)  # kernel [3] -> Winograd domain [6]
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float32)  # Winograd domain [6] -> output tile [4]
SPAN = BT.shape[0]  # input tile: 6 = TILE + 3 - 1


def _split(x: jax.Array, axis: int) -> list[jax.Array]:
    """The slices of `x` along `axis`, that axis dropped."""
    return [lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]


def _combine(matrix: np.ndarray, parts: list[jax.Array]) -> list[jax.Array]:
    """`matrix` [rows, len(parts)] applied to `parts` (equal-shaped arrays): one sum of scaled parts
    per row, which XLA fuses into one loop, where a matmul with a 6-long contraction would run far
    below peak."""
    rows = []
    for coefficients in matrix:
        terms = [float(c) * parts[i] if c not in (1, -1) else (parts[i] if c == 1 else -parts[i])
                 for i, c in enumerate(coefficients) if c != 0]
        rows.append(sum(terms[1:], terms[0]))
    return rows


def _on_both_axes(matrix: np.ndarray, x: jax.Array) -> jax.Array:
    """M x M^T over x's two leading axes, for each index of the others: [k, k, ...] -> [r, r, ...]
    for `matrix` M [r, k]."""
    rows = jnp.stack(_combine(matrix, _split(x, 0)))  # [r, k, ...]
    return jnp.stack(_combine(matrix, _split(rows, 1)), axis=1)


def _tile_count(size: int) -> int:
    """Output tiles along an axis of `size`: whole TILEs, the last one zero-padded."""
    return -(-size // TILE)


def _windows(x: jax.Array, axis: int, count: int) -> list[jax.Array]:
    """The SPAN elements of `count` overlapping windows TILE apart along `axis` (of length
    TILE * (count + 1)): SPAN arrays with `count` along `axis`, element i of every window in the
    i-th. Reshapes and slices, no gather: window t's element i is row 4t + i, that is row i % 4 of
    block t + i // 4 when the axis is cut into blocks of TILE."""
    blocks = x.reshape(x.shape[:axis] + (count + 1, TILE) + x.shape[axis + 1:])
    return [lax.slice_in_dim(lax.index_in_dim(blocks, i % TILE, axis + 1, keepdims=False),
                             i // TILE, i // TILE + count, axis=axis) for i in range(SPAN)]


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, C, O] -> [36, C, O]: G k G^T for every channel pair."""
    return _on_both_axes(G, kernel).reshape(SPAN * SPAN, *kernel.shape[2:])


def transform_input(x: jax.Array) -> tuple[jax.Array, int, int]:
    """[B, H, W, C] -> ([36, B * th * tw, C], th, tw): B^T d B for every 6x6 tile d of the input,
    zero-padded by one on each side (SAME) and up to whole output tiles; th x tw tiles."""
    _, height, width, _ = x.shape
    th, tw = _tile_count(height), _tile_count(width)
    x = jnp.pad(x, ((0, 0), (1, TILE * (th + 1) - height - 1), (1, TILE * (tw + 1) - width - 1),
                    (0, 0)))
    rows = jnp.stack(_combine(BT, _windows(x, 1, th)))  # [6, B, th, W + pad, C]
    v = jnp.stack(_combine(BT, _windows(rows, 3, tw)), axis=1)  # [6, 6, B, th, tw, C]
    return v.reshape(SPAN * SPAN, -1, x.shape[-1]), th, tw


def transform_output(m: jax.Array, batch: int, th: int, tw: int, height: int,
                     width: int) -> jax.Array:
    """[36, B * th * tw, O] -> [B, H, W, O]: A^T m A for every tile, the tiles put side by side."""
    y = _on_both_axes(AT, m.reshape(SPAN, SPAN, batch, th, tw, m.shape[-1]))  # [4, 4, B, th, tw, O]
    y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(batch, th * TILE, tw * TILE, -1)
    return y[:, :height, :width]


def transform_output_transpose(dy: jax.Array) -> jax.Array:
    """`transform_output`'s transpose, [B, H, W, O] -> [36, B * th * tw, O]: A g A^T for every
    4x4 tile g of `dy`, zero-padded up to whole tiles."""
    batch, height, width, features = dy.shape
    th, tw = _tile_count(height), _tile_count(width)
    dy = jnp.pad(dy, ((0, 0), (0, th * TILE - height), (0, tw * TILE - width), (0, 0)))
    g = jnp.transpose(dy.reshape(batch, th, TILE, tw, TILE, features), (2, 4, 0, 1, 3, 5))
    return _on_both_axes(AT.T, g).reshape(SPAN * SPAN, -1, features)


def transform_kernel_transpose(du: jax.Array) -> jax.Array:
    """`transform_kernel`'s transpose, [36, C, O] -> [3, 3, C, O]: G^T u G for every channel pair."""
    return _on_both_axes(G.T, du.reshape(SPAN, SPAN, *du.shape[1:]))


def _winograd_domain_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """The 36 position-wise matmuls, batched over the leading axis, contracting axis contract[0] of
    `a` [36, ., .] with axis contract[1] of `b` [36, ., .]; full float32 (no TF32 where a GPU runs
    it)."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                           precision=lax.Precision.HIGHEST)


def _conv3x3(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, C], [3, 3, C, O] -> the convolution [B, H, W, O] and the input in the Winograd
    domain [36, tiles, C] (kept for the kernel's gradient)."""
    batch, height, width, _ = x.shape
    v, th, tw = transform_input(x)
    m = _winograd_domain_dot(v, transform_kernel(kernel), (2, 1))  # [36, tiles, O]
    return transform_output(m, batch, th, tw, height, width), v


@jax.custom_vjp
def _conv3x3_with_winograd_gradients(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """[B, H, W, C], [3, 3, C, O] -> [B, H, W, O], with `_conv3x3_bwd` as its VJP (reverse mode
    only: `jax.jvp` and `jax.jacfwd` of it raise)."""
    return _conv3x3(x, kernel)[0]


def _conv3x3_fwd(x: jax.Array, kernel: jax.Array):
    """The output, and the input's transform [36, tiles, C] and the kernel for the backward pass."""
    y, v = _conv3x3(x, kernel)
    return y, (v, kernel)


def _conv3x3_bwd(residuals, dy):
    """dy [B, H, W, O] -> (dx [B, H, W, C], dkernel [3, 3, C, O]). Both gradients in the Winograd
    domain, each from cheap forward-style transforms: the input's is the same convolution of `dy`
    with the kernel turned 180 degrees and its channels swapped; the kernel's is the 36 matmuls of
    the input's and `dy`'s transforms, taken back by G^T . G."""
    v, kernel = residuals
    dm = transform_output_transpose(dy)  # [36, tiles, O]
    dkernel = transform_kernel_transpose(_winograd_domain_dot(v, dm, (1, 1)))  # [36, C, O]
    dx = _conv3x3(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))[0]
    return dx, dkernel


_conv3x3_with_winograd_gradients.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """SAME float32 3x3 convolution, stride 1, NHWC x HWIO: [B, H, W, C], [3, 3, C, O] ->
    [B, H, W, O]."""
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"winograd.conv3x3 is for float32, not {x.dtype} x {kernel.dtype}: its "
                        "transforms' rounding would swamp a narrower type's")
    return _conv3x3_with_winograd_gradients(x, kernel)
