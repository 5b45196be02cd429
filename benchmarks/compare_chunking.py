r"""The fast layers (`attn_jax/fast/`: attention in chunks of examples on CPU, ...) against the
reference layers, timed on the same train step.

    python benchmarks/compare_chunking.py --config=experiments/vit.py --rounds=6

Builds the experiment's train step twice in one process, once from the model's reference layers
(`registry.create_model(..., impl="reference")`) and once from its fast ones (`impl="fast"`; the same
parameters and function), and times one step of each in turn per round on the same synthetic
batch. A shared machine's speed drifts, so only the per-round ratios are compared; their median is
the figure.

    python benchmarks/compare_chunking.py --config=experiments/vit.py --chunk_mib=2,4,8,16

times the fast layers at each of those chunk sizes (`attn_jax.fast.chunking.CHUNK_BYTES`) beside
the reference, to choose the size on another CPU: each size's median speed over the reference's.
"""

import argparse
import statistics
import time

import jax

from attn_jax import train
from attn_jax.bench import steps
from attn_jax.experiment import load_module
from attn_jax.fast import chunking


def compiled_step(config, mesh, batch, stats, impl: str, chunk_mib: float | None = None):
    """[compiled train step, fresh state, train key] of the experiment's model built from the
    `impl` layers ("reference" or "fast"), the fast ones in chunks of `chunk_mib` (None: the
    default `chunking.CHUNK_BYTES`)."""
    default = chunking.CHUNK_BYTES
    if chunk_mib is not None:
        chunking.CHUNK_BYTES = int(chunk_mib * 2 ** 20)  # read when the step is traced
    try:
        _, state, train_key = steps.initial_state(config, mesh, impl=impl)
        train_fn = train.jit_train_step(config, mesh)
        return [train_fn.lower(state, batch, train_key, stats).compile(), state, train_key]
    finally:
        chunking.CHUNK_BYTES = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="an experiment file, e.g. experiments/vit.py")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--chunk_mib", default=None,
                        help="comma-separated chunk sizes in MiB to time the fast layers at")
    args = parser.parse_args()
    config = load_module(args.config).get_config()
    mesh = train.create_mesh()
    stats = steps.placeholder_stats(config)
    batch = steps.synthetic_batch(config.batch_size, steps.raw_image_shape(config),
                                  config.dataset.num_classes, mesh)
    if args.chunk_mib:
        sizes = [float(v) for v in args.chunk_mib.split(",")]
        compiled = {"reference": compiled_step(config, mesh, batch, stats, "reference")}
        compiled |= {f"fast {mib:g} MiB": compiled_step(config, mesh, batch, stats, "fast", mib)
                     for mib in sizes}
    else:
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
    ratios = {name: [] for name in compiled if name != "reference"}
    for i in range(args.rounds):
        reference = timed_step("reference")
        line = [f"round {i + 1}: reference {reference:.2f} s"]
        for name in ratios:
            seconds = timed_step(name)
            ratios[name].append(reference / seconds)
            line.append(f"{name} {seconds:.2f} s ({ratios[name][-1]:.2f}x)")
        print(", ".join(line), flush=True)
    for name, values in ratios.items():
        print(f"{config.model.name} ({config.model.get('attention', '')}) batch "
              f"{config.batch_size}: {name} / reference speed, median over {args.rounds} rounds: "
              f"{statistics.median(values):.2f}x")


if __name__ == "__main__":
    main()
