"""What experiment files use: loading one another by path (`experiments/` is a folder of files,
not a package) and the benchmark's default knobs. Light on purpose: loading an experiment imports no
JAX or TensorFlow."""

import importlib.util
import types
from pathlib import Path

import ml_collections


def load_module(path: str | Path) -> types.ModuleType:
    """The Python file at `path`, executed as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling_config(file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment `name` in the folder of `file` (an experiment's
    `__file__`): how one experiment builds on another."""
    return load_module(Path(file).with_name(f"{name}.py")).get_config(arg)


def benchmark_settings() -> ml_collections.ConfigDict:
    """The benchmark's knobs, an experiment's `config.benchmark` (so `--config.benchmark.x=...`
    overrides them); none changes what is computed, only how long and how often it is timed."""
    return ml_collections.ConfigDict({
        "warmup": 2,  # untimed blocks of `steps` calls of each step before the timings
        # more blocks (where freed host memory is kept), up to this many in all, until two in a row
        # fault no memory in; warmup=0 turns both off
        "warmup_max": 12,
        "repeats": 5,  # timings per step; the median is reported
        "steps": 3,  # calls per timing
        "eval": True,  # also time the eval step
        "matmul_sizes": (2048, 4096),  # CPU peak: square matmul sizes tried, the best one counts
        "matmul_repeats": 5,
        "pipeline": True,  # time the input pipeline and real-vs-synthetic training (needs the data)
        "pipeline_batches": 100,  # batches of the streamed pipeline timed alone
        "compare_steps": 5,  # train steps per round, real pipeline and synthetic each
        "rounds": 4,  # alternating rounds of each; medians are compared
        "profile_steps": 0,  # > 0 (needs --workdir): trace that many train steps, print the top ops
    })
