"""A `jax.profiler` trace of train steps, and where its time went by forward/backward, op kind and
layer (read from the XLA op names in the trace, which XLA:CPU's traces carry)."""

import collections
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax


def op_names(compiled) -> dict[str, str]:
    """XLA instruction name -> the JAX op it came from ("jit(train_step)/.../Conv_1/conv_...")."""
    return dict(re.findall(r'%(\S+) = .*?metadata=\{op_name="([^"]+)"', compiled.as_text()))


def trace_steps(call: Callable[[], object], compiled, steps: int, directory: Path) -> str:
    """Traces `steps` calls of `call` (one warm-up call first) into `directory` and returns
    `op_table` of the newest trace written there."""
    jax.block_until_ready(call())
    with jax.profiler.trace(str(directory)):
        for _ in range(steps):
            jax.block_until_ready(call())
    traces = sorted(directory.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        return f"trace written to {directory} (no trace.json.gz to summarise)"
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
    return op_table(events, op_names(compiled), steps, directory)


def op_table(events: list[dict], names: dict[str, str], steps: int, directory: Path) -> str:
    """A table of where the time of the traced `events` went: per step, by forward/backward and JAX
    primitive (every one, so that a small share is not cut off by a neighbour's noise), then the 15
    slowest XLA ops by layer. `names` maps the XLA ops to their JAX ops (`op_names`)."""
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            per_op[event["name"]] += event.get("dur", 0) / steps / 1e3  # ms per step
    if not per_op:
        return f"trace written to {directory} (its events do not name XLA ops: open it in a viewer)"
    by_kind: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        op = names[name]
        by_kind[("backward " if "transpose(" in op else "forward ") + op.rsplit("/", 1)[-1]] += ms
    total = sum(per_op.values())
    lines = [f"op time per train step: {total:.0f} ms (trace in {directory})"]
    lines += [f"{ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}" for kind, ms in by_kind.most_common()]
    lines.append("slowest ops:")
    lines += [f"{ms:9.1f} ms  {names[name].split('/', 1)[-1]}" for name, ms in per_op.most_common(15)]
    return "\n".join(lines)
