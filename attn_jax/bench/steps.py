"""The train and eval steps as a run builds them, on synthetic data, and their timing."""

import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax import data
from attn_jax import state as train_state


def raw_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The dataset's stored image shape, from tfds' metadata (no download); (size, size, 3) if the
    dataset does not fix it."""
    import tensorflow_datasets as tfds

    import attn_jax.datasets  # noqa: F401  (registers the datasets attn_jax ships)

    try:
        shape = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir).info.features[
            config.dataset.image_key].shape
    except Exception:  # noqa: BLE001  (an unknown dataset: fall back to the model's input size)
        shape = None
    if not shape or None in shape:
        shape = (config.preprocess.size, config.preprocess.size, 3)
    return tuple(int(s) for s in shape)


def synthetic_batch(size: int, image_shape, num_classes: int, mesh, seed: int = 0) -> dict:
    """A global batch of random uint8 images and labels on `mesh`, every example real (mask True)."""
    rng = np.random.default_rng(seed)
    local = size // jax.process_count()
    return data.to_global({"images": rng.integers(0, 256, (local, *image_shape), dtype=np.uint8),
                           "labels": rng.integers(0, num_classes, local).astype(np.int32),
                           "mask": np.ones(local, bool)}, mesh)


# The benchmark's learning-rate schedule runs over this many steps (its values do not change the
# speed; a run's spans its epochs).
SCHEDULE_STEPS = 1000


def initial_state(config: ml_collections.ConfigDict, mesh, impl: str | None = None, *,
                  abstract: bool = False) -> tuple:
    """(model, initial train state on `mesh`, train key), built by `state.initial_state` as a run
    builds them (EMA included where config.ema keeps one) but without data: the model from the
    layers `impl` chooses (default config.model.impl). `abstract`: the state's shapes and
    shardings only."""
    model, _, state = train_state.initial_state(config, mesh, SCHEDULE_STEPS, impl=impl,
                                                abstract=abstract)
    return model, state, train_state.run_keys(config.seed)[1]


def placeholder_stats(config: ml_collections.ConfigDict):
    """Per-channel statistics for "standardize" (their values do not change the speed), or None."""
    if config.preprocess.normalize != "standardize":
        return None
    return {"mean": jnp.full((3,), 127.5, jnp.float32), "std": jnp.full((3,), 64.0, jnp.float32)}


def compile_step(fn, *args) -> tuple[object, float, float]:
    """(compiled, lower seconds, compile seconds) of the jitted `fn` on `args`."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


class Stepper:
    """Calls a compiled train step on the same arguments, the train state carried from call to call
    (the step donates it): `stepper()` steps once and returns the new state, to wait on."""

    def __init__(self, compiled, state, *args):
        self.compiled, self.state, self.args = compiled, state, args

    def __call__(self):
        self.state, _ = self.compiled(self.state, *self.args)
        return self.state


def host_page_faults() -> int:
    """This process's minor page faults so far: pages the kernel mapped in (and zeroed) on first
    touch, as the host's allocator grows."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# A warm-up block has settled when it faulted in at most this many pages per call (1 MiB of 4 KiB
# pages): a step that still grows the heap faults in its temporaries, 143,000 pages for the
# tutorial PatchConvNet's train step on CPU.
SETTLED_FAULTS_PER_CALL = 256


def _block(call: Callable[[], object], steps: int,
           probe: Callable[[], float] | None) -> tuple[float, int, float | None, int]:
    """`steps` consecutive calls of `call`, waited on, then `probe()` if given: (seconds of the
    calls, their host page faults, the probe's result, the page faults of both)."""
    faults, start = host_page_faults(), time.perf_counter()
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    seconds, call_faults = time.perf_counter() - start, host_page_faults() - faults
    peak = probe() if probe is not None else None
    return seconds, call_faults, peak, host_page_faults() - faults


def time_step(call: Callable[[], object], warmup: int, repeats: int, steps: int,
              probe: Callable[[], float] | None = None,
              warmup_max: int = 0) -> tuple[list[float], list[float], dict]:
    """Seconds per call of `call` (which must return what to wait on), `repeats` times over `steps`
    consecutive calls; and, if given, `probe()` (the peak FLOP/s) run right after each timing, so
    that each timing has a peak measured at the same moment.

    Before the timings, untimed warm-up blocks in the timings' own pattern (`steps` calls, a few
    steps in flight at once, then the probe): `warmup` of them, then more until two blocks in a row
    fault no memory in (at most `SETTLED_FAULTS_PER_CALL` pages per call), up to `warmup_max`
    blocks in all. Where freed memory is kept (`host_memory`), a CPU process's heap grows over its
    first steps and is then reused; a timing of that growth would measure the kernel zeroing pages,
    not the step. Also returns {"warmup_blocks", "page_faults_all"}: how many warm-up blocks ran
    and each timing's host page faults per call (the probe's not included).
    """
    blocks, quiet = 0, 0
    while blocks < warmup or (warmup > 0 and quiet < 2 and blocks < warmup_max):
        settled = _block(call, steps, probe)[3] <= SETTLED_FAULTS_PER_CALL * steps
        quiet = quiet + 1 if settled else 0
        blocks += 1
    per_step, peaks, faults = [], [], []
    for _ in range(repeats):
        seconds, call_faults, peak, _ = _block(call, steps, probe)
        per_step.append(seconds / steps)
        faults.append(call_faults / steps)
        if probe is not None:
            peaks.append(peak)
    return per_step, peaks, {"warmup_blocks": blocks, "page_faults_all": faults}


def step_report(seconds: list[float], peaks: list[float], warm: dict, batch: int, flops: float,
                model_flops_per_image: float, lower_s: float, compile_s: float) -> dict:
    """Images/s and FLOP/s from the median step time; MFU as the median over the timings of each
    timing's FLOP/s over the peak measured beside it (on a shared machine both drift together);
    `warm` (`time_step`'s warm-up record) is copied in."""
    step = statistics.median(seconds)

    def mfu(flops_per_step: float) -> float | None:
        if not peaks:
            return None
        return statistics.median(flops_per_step / (s * p) for s, p in zip(seconds, peaks, strict=True))

    return {
        "images_per_s": batch / step,
        "step_ms": 1e3 * step,
        "step_ms_all": [round(1e3 * s, 2) for s in seconds],
        **warm,
        "peak_flops_per_s_all": peaks,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "flops_per_image": flops / batch,
        "flops_per_s": flops / step,
        "mfu": mfu(flops),
        "model_flops_per_image": model_flops_per_image,
        "model_flops_per_s": model_flops_per_image * batch / step,
        "mfu_model": mfu(model_flops_per_image * batch),
    }


def format_step(name: str, r: dict) -> str:
    """The console line of a step's report."""
    mfu = f"MFU {100 * r['mfu']:.1f}% (model FLOPs: {100 * r['mfu_model']:.1f}%)" \
        if r["mfu"] is not None else "MFU n/a (unknown device peak)"
    return (f"{name} step: {r['images_per_s']:.1f} images/s ({r['step_ms']:.0f} ms/step), "
            f"{r['flops_per_image'] / 1e9:.3f} GFLOP/image (XLA; model "
            f"{r['model_flops_per_image'] / 1e9:.3f}), {r['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{mfu}; compiled in {r['lower_s'] + r['compile_s']:.1f}s")
