r"""Attention in chunks of examples (`attn_jax/models/chunking.py`) against whole-batch attention.

    python benchmarks/compare_chunking.py --config=experiments/vit.py --rounds=6

Builds the experiment's train step twice in one process, once with whole-batch attention
(`chunking.whole_batch()`) and once as a run builds it (chunked on CPU), and times one step of each
in turn per round on the same synthetic batch. A shared machine's speed drifts, so only the
per-round ratios are compared; their median is the figure.
"""

import argparse
import contextlib
import statistics
import time

import jax

from attn_jax import benchmark, train
from attn_jax.experiment import load_module
from attn_jax.models import chunking


def compiled_step(config, mesh, batch, stats, whole: bool):
    """(compiled train step, fresh state, train key) of the experiment, with or without chunked
    attention."""
    _, state, train_key = benchmark.initial_state(config, mesh)
    with chunking.whole_batch() if whole else contextlib.nullcontext():
        train_fn, _ = train.jit_steps(config, mesh)
        return [train_fn.lower(state, batch, train_key, stats).compile(), state, train_key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="an experiment file, e.g. experiments/vit.py")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    config = load_module(args.config).get_config()
    mesh = train.create_mesh()
    stats = benchmark.placeholder_stats(config)
    batch = benchmark.synthetic_batch(config.batch_size, benchmark.raw_image_shape(config),
                                      config.dataset.num_classes, mesh)
    steps = {name: compiled_step(config, mesh, batch, stats, name == "whole")
             for name in ("whole", "chunked")}

    def timed_step(name):
        compiled, state, train_key = steps[name]
        start = time.perf_counter()
        state, _ = compiled(state, batch, train_key, stats)
        jax.block_until_ready(state)
        steps[name][1] = state
        return time.perf_counter() - start

    for name in steps:  # warm-up
        timed_step(name)
    ratios = []
    for i in range(args.rounds):
        whole, chunked = timed_step("whole"), timed_step("chunked")
        ratios.append(whole / chunked)
        print(f"round {i + 1}: whole {whole:.2f} s, chunked {chunked:.2f} s: {ratios[-1]:.2f}x",
              flush=True)
    print(f"{config.model.name} ({config.model.get('attention', '')}) batch {config.batch_size}: "
          f"chunked / whole-batch speed, median over {args.rounds} rounds: "
          f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
