r"""The fast layers (`attn_jax/fast/`: attention in chunks of examples on CPU, ...) against the
reference layers, timed on the same train step.

    python benchmarks/compare_chunking.py --config=experiments/vit.py --rounds=6

Builds the experiment's train step twice in one process, once from the model's reference layers
(`models.create_model(..., impl="reference")`) and once from its fast ones (`impl="fast"`; the same
parameters and function), and times one step of each in turn per round on the same synthetic
batch. A shared machine's speed drifts, so only the per-round ratios are compared; their median is
the figure.
"""

import argparse
import statistics
import time

import jax

from attn_jax import train
from attn_jax.bench import steps
from attn_jax.experiment import load_module


def compiled_step(config, mesh, batch, stats, impl: str):
    """[compiled train step, fresh state, train key] of the experiment's model built from the
    `impl` layers ("reference" or "fast")."""
    _, state, train_key = steps.initial_state(config, mesh, impl=impl)
    train_fn, _ = train.jit_steps(config, mesh)
    return [train_fn.lower(state, batch, train_key, stats).compile(), state, train_key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="an experiment file, e.g. experiments/vit.py")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    config = load_module(args.config).get_config()
    mesh = train.create_mesh()
    stats = steps.placeholder_stats(config)
    batch = steps.synthetic_batch(config.batch_size, steps.raw_image_shape(config),
                                  config.dataset.num_classes, mesh)
    compiled = {impl: compiled_step(config, mesh, batch, stats, impl)
                for impl in ("reference", "fast")}

    def timed_step(impl):
        step, state, train_key = compiled[impl]
        start = time.perf_counter()
        state, _ = step(state, batch, train_key, stats)
        jax.block_until_ready(state)
        compiled[impl][1] = state
        return time.perf_counter() - start

    for impl in compiled:  # warm-up
        timed_step(impl)
    ratios = []
    for i in range(args.rounds):
        reference, fast = timed_step("reference"), timed_step("fast")
        ratios.append(reference / fast)
        print(f"round {i + 1}: reference {reference:.2f} s, fast {fast:.2f} s: {ratios[-1]:.2f}x",
              flush=True)
    print(f"{config.model.name} ({config.model.get('attention', '')}) batch {config.batch_size}: "
          f"fast / reference speed, median over {args.rounds} rounds: "
          f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
