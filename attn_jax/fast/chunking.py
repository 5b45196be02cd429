"""Attention computed a few examples at a time on CPU, so that its [h, N, N] tensors stay in cache.

The ViT baseline's attention weights are [B, heads, N, N] = 128 x 4 x 256 x 256 floats (134 MB) per
block at the tutorial's batch. XLA:CPU computes the scores, the softmax's max, sum and division, the
dropout and the weighted sum as separate passes over that tensor, each from main memory; in the
backward pass again. EANet's softmax over the tokens of [B, N, heads, S] weights is strided the same
way. `map_in_chunks` applies a layer to one chunk of examples at a time (`lax.map`) and recomputes
each chunk's intermediates in the backward pass (`jax.checkpoint`; only the softmax's log-sum-exp
is kept, `keep_for_backward`), so that every pass reads data that is still in cache: recomputing
in cache costs less than passing over main memory (docs/performance.md#attention-in-chunks-of-examples;
`benchmarks/compare_chunking.py` times it).

The result is the same function: each example's attention is computed alone in both forms, and the
dropout mask is drawn for the whole batch before it is split, so it does not depend on the chunking.
`config.model.impl` "auto" chunks on CPU only (`registry.layers_for`): GPUs and TPUs keep one
whole-batch computation, the reference layers'.
"""

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

# The name of the small statistics (a softmax's log-sum-exp) that the backward pass keeps instead
# of recomputing them: see `keep_for_backward`.
STATISTICS = "softmax_statistics"

# Largest per-device chunk of the biggest attention intermediate, in bytes: the size that timed
# fastest against smaller and larger chunks and the whole batch, with no other size clearly ahead
# since (docs/performance.md#attention-in-chunks-of-examples).
CHUNK_BYTES = 4 * 2 ** 20


def num_chunks(batch: int, bytes_per_example: int, devices: int | None = None) -> int:
    """How many chunks to split a (global) batch into: the fewest whose per-device share of
    `bytes_per_example * batch` fits in `CHUNK_BYTES`. The count divides the per-device batch, so
    every chunk is a whole number of examples on every device (1 when the batch does not divide)."""
    devices = devices or jax.device_count()
    if batch % devices:
        return 1
    local = batch // devices
    fitting = (n for n in range(1, local + 1)
               if local % n == 0 and local // n * bytes_per_example <= CHUNK_BYTES)
    return next(fitting, local)  # one example per chunk if even one does not fit


def _split(x: jax.Array, chunks: int, devices: int) -> jax.Array:
    """[B, ...] -> [chunks, B / chunks, ...], chunk i taking the i-th slice of every device's share,
    so a batch sharded over `devices` stays sharded within each chunk."""
    rest = x.shape[1:]
    x = x.reshape(devices, chunks, -1, *rest).swapaxes(0, 1)
    return x.reshape(chunks, -1, *rest)


def _merge(x: jax.Array, devices: int) -> jax.Array:
    """The inverse of `_split`: [chunks, B / chunks, ...] -> [B, ...]."""
    chunks, rest = x.shape[0], x.shape[2:]
    x = x.reshape(chunks, devices, -1, *rest).swapaxes(0, 1)
    return x.reshape(-1, *rest)


def map_in_chunks(fn: Callable[..., jax.Array], chunks: int, *args: jax.Array | None,
                  devices: int | None = None) -> jax.Array:
    """`fn(*args)` for arrays with a leading batch axis, computed in `chunks` slices of the batch.

    `fn` must treat examples independently; its output has the leading batch axis too. `None`
    arguments pass through. In the backward pass each chunk's intermediates are recomputed (on the
    ViT baseline's attention, keeping its projections instead measured slower: recomputing in
    cache costs less than storing and reloading), except the small statistics that `fn` marks
    with `keep_for_backward`.
    """
    if chunks == 1:
        return fn(*args)
    devices = devices or jax.device_count()
    split = tuple(None if a is None else _split(a, chunks, devices) for a in args)
    fn = jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(STATISTICS))
    out = jax.lax.map(lambda chunk: fn(*chunk), split)
    return _merge(out, devices)


def keep_for_backward(statistic: jax.Array) -> jax.Array:
    """`statistic`, marked for `map_in_chunks` to keep for the backward pass instead of recomputing
    it: for a softmax's log-sum-exp, 1/N the size of its weights, whose max and sum passes then
    need not be repeated. Same value and shape; gradients pass unchanged."""
    return checkpoint_name(statistic, STATISTICS)
