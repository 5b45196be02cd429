"""Counting XLA compilations: the benchmark reports how many each step took (one, as in a run),
and tests check that a run compiles each step once."""

import collections
import contextlib
from collections.abc import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
    """Counts XLA compilations by jitted function name ("jit(train_step)", ...) inside the block.

    Counts JAX's `/jax/core/compile/backend_compile_duration` events, recorded once per executable
    JAX asks XLA for, whether XLA compiles it or the persistent compilation cache supplies it; a call
    served by JAX's in-memory caches records nothing.
    """
    counts: collections.Counter = collections.Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration
        if event == BACKEND_COMPILE_EVENT:
            counts[str(kwargs.get("fun_name", "?"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
