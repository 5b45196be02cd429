"""`config.benchmark`'s defaults, kept apart from `benchmark.py` so that loading an experiment file
stays light (no TensorFlow or JAX import)."""

import ml_collections


def default_settings() -> ml_collections.ConfigDict:
    """The benchmark's knobs, an experiment's `config.benchmark` (so `--config.benchmark.x=...`
    overrides them); none changes what is computed, only how long and how often it is timed."""
    return ml_collections.ConfigDict({
        "warmup": 2,  # untimed calls of each step before the timings
        "repeats": 5,  # timings per step; the median is reported
        "steps": 3,  # calls per timing
        "eval": True,  # also time the eval step
        "matmul_sizes": (2048, 4096),  # CPU peak: square matmul sizes tried, the best one counts
        "matmul_repeats": 5,
        "pipeline": True,  # time the input pipeline and real-vs-synthetic training (needs the data)
        "pipeline_batches": 100,  # batches timed from the cache (second epoch)
        "compare_steps": 5,  # train steps per round, real pipeline and synthetic each
        "rounds": 4,  # alternating rounds of each; medians are compared
        "profile_steps": 0,  # > 0 (needs --workdir): trace that many train steps, print the top ops
    })
