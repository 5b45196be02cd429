"""`--mode=benchmark`: how fast the train and eval steps run on the current devices, and whether the
input pipeline could starve them.

    python launch.py --config=experiments/patch_convnet.py --mode=benchmark [--workdir=DIR]

Measured, in this order, in one process:

1. The peak the model-FLOP utilisation (MFU) is measured against: a table of dense per-device peaks
   for GPUs and TPUs (`PEAK_FLOPS`), and on CPU the FLOP/s of a large square `jnp.dot` in the compute
   dtype, timed here: the best of `matmul_sizes` is chosen first, then re-timed right after every
   step timing, and each timing's MFU is its FLOP/s over the peak measured beside it (the median of
   those ratios is reported). A shared machine's speed drifts (the same matmul measured 77 to 109
   GFLOP/s within minutes on this project's machine); pairing each timing with its own peak keeps
   the ratio honest. XLA:CPU runs one device's program on every core of the process, so with
   several (fake) CPU devices this is the peak of all of them together, not of each.
2. The train step and the eval step, ahead-of-time compiled (`train.jit_steps`: one step on a given
   batch, the step a run's calls are made of; part 4 times the calls themselves), timed on one
   device-resident batch of random uint8 images (synthetic: no
   input pipeline): `warmup` calls, then `repeats` timings of `steps` calls each; the median per
   step gives images/s. FLOPs per image come from XLA's cost analysis of the compiled step (every
   op it keeps, element-wise ones included, a multiply-add as 2; a step with loops, as attention
   computed in chunks of examples on CPU, is counted from its whole-batch form, since XLA counts a
   loop body once): `mfu` is those FLOP/s over the peak. `mfu_model` counts model FLOPs instead,
   the usual convention: the convolutions and matrix products of one forward pass (`model_flops`),
   three times for a train step, once for eval.
3. The streamed input pipeline alone (`data.StreamedFeed`: grain workers read and decode, batches
   put on the mesh, nothing stepping) over `pipeline_batches` batches.
4. The feeds against synthetic data: training as a run trains (`train.jit_train_steps`,
   config.steps_per_call steps per call), fed by the device-resident split (when it fits; the time
   to decode it and put it on the devices is reported), by the streamed pipeline (started before
   the timing, as in a run) and by one synthetic resident batch, in `rounds` alternating rounds of
   about `compare_steps` steps; the ratios of the median images/s say what each feed costs.

5. With `profile_steps` > 0 and a workdir, a `jax.profiler` trace of that many train steps in
   `DIR/profile` (TensorBoard's profile plugin or Perfetto read it) and, where the trace names XLA's
   ops (XLA:CPU does), the time per step by forward/backward and op kind and the slowest ops with
   the layer each belongs to (`profile.txt`).

Parts 3 and 4 need the dataset prepared in config.dataset.data_dir: the benchmark never downloads,
and skips them (saying why) otherwise. Nothing writes unless `workdir` is given; then
`DIR/benchmark.json` holds everything printed. Knobs: `config.benchmark.*` (`benchmark_settings()`).
"""

import collections
import contextlib
import copy
import gzip
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from attn_jax import atomic, data, summary, train
from attn_jax.errors import UserError
from attn_jax.experiment import benchmark_settings
from attn_jax.models import chunking

# Dense peak FLOP/s per device, by the start of `jax.Device.device_kind`, most specific first.
# float32 on GPU counts TF32 tensor cores (JAX's default matmul precision there); on TPU float32
# matmuls run as bfloat16 passes at the default precision, so both dtypes share the bfloat16 peak.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e
}

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def settings(config: ml_collections.ConfigDict) -> dict:
    """`benchmark_settings()` updated by the config's `benchmark` section, if it has one."""
    opts = benchmark_settings().to_dict()
    if "benchmark" in config:
        opts.update(config.benchmark.to_dict())
    return opts


# ---------------------------------------------------------------------------------------------
# Counting compilations
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_compilations() -> Iterator[collections.Counter]:
    """Counts XLA compilations by jitted function name ("jit_train_step", ...) inside the block.

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


# ---------------------------------------------------------------------------------------------
# Peaks
# ---------------------------------------------------------------------------------------------
def table_peak(device: jax.Device, dtype: str) -> float | None:
    """`PEAK_FLOPS` for `device` in `dtype`, or None for a device the table does not know."""
    for kind, peaks in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return peaks.get(dtype)
    return None


def matmul_peak(dtype: str, sizes=(2048, 4096), repeats: int = 5, device=None) -> dict:
    """FLOP/s of a square `jnp.dot` on `device` (default: the first local one), the best size's
    median over `repeats` runs: {"flops_per_s", "size", "by_size"}."""
    by_size = {n: _median_of(matmul_probe(dtype, n, device), repeats) for n in sizes}
    best = max(by_size, key=by_size.get)
    return {"flops_per_s": by_size[best], "size": best,
            "by_size": {str(n): v for n, v in by_size.items()}}


def matmul_probe(dtype: str, size: int, device=None) -> Callable[[], float]:
    """A compiled square matmul of `size` on `device`: calling it times one product, in FLOP/s."""
    device = jax.local_devices()[0] if device is None else device
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dtype), device)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(dot(a, b))

    def probe() -> float:
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        return 2 * size ** 3 / (time.perf_counter() - start)

    return probe


def _median_of(probe: Callable[[], float], repeats: int) -> float:
    """The median of `repeats` calls of `probe`."""
    return statistics.median(probe() for _ in range(repeats))


def device_peak(dtype: str, mesh, opts: dict) -> tuple[dict, Callable[[], float] | None]:
    """The peak MFU is measured against, as (description, probe): on CPU a matmul of the best of
    `opts["matmul_sizes"]`, re-timed by `probe()` (median of `matmul_repeats` products) beside each
    step timing; elsewhere the `PEAK_FLOPS` table times the devices (probe None if it does not
    know the device)."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        sizes = matmul_peak(dtype, opts["matmul_sizes"], opts["matmul_repeats"], device)
        product = matmul_probe(dtype, sizes["size"], device)
        info = {"source": f"measured: {dtype} {sizes['size']}^2 matmul beside each timing",
                "by_size": sizes["by_size"]}
        return info, lambda: _median_of(product, opts["matmul_repeats"])
    per_device = table_peak(device, dtype)
    info = {"source": f"table: {device.device_kind} {dtype} x {mesh.devices.size}"}
    if per_device is None:
        return info, None
    return info, lambda: per_device * mesh.devices.size


# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------
def xla_flops(compiled, num_devices: int, whole_batch: Callable[[], object]) -> float:
    """FLOPs of one call of a compiled program on `num_devices` devices, from XLA's cost analysis
    (of the per-device, SPMD-partitioned program: scaled by the number of devices).

    XLA counts a loop's body once, so a program with loops (attention computed a few examples at a
    time on CPU, `models/chunking.py`) is counted from `whole_batch()`: the same step compiled with
    `chunking.whole_batch()`, the same function without the loops.
    """
    if " while(" in compiled.as_text():
        compiled = whole_batch()
    return summary.cost_flops(compiled) * num_devices


def compile_whole_batch(config: ml_collections.ConfigDict, mesh, step: str, *args):
    """The train or eval `step` compiled afresh with whole-batch attention, for its FLOP count."""
    with chunking.whole_batch():
        train_fn, eval_fn = train.jit_steps(config, mesh)
        return (train_fn if step == "train" else eval_fn).lower(*args).compile()


def model_flops(model, image_shape: tuple[int, int, int]) -> float:
    """FLOPs of one image's forward pass counting only its convolutions and matrix products, 2 per
    multiply-add (`summary.forward_macs`): the usual MFU numerator, 3 forward passes for a train
    step (forward, input and weight gradients) and one for eval; element-wise work is not counted."""
    return 2.0 * summary.forward_macs(model, summary.abstract_variables(model, image_shape),
                                      image_shape)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def raw_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The dataset's stored image shape, from tfds' metadata (no download); (size, size, 3) if the
    dataset does not fix it."""
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


def initial_state(config: ml_collections.ConfigDict, mesh) -> tuple:
    """(model, initial train state on `mesh`, train key), built as a run builds them but without
    data: the learning-rate schedule assumes 1000 steps (its values do not change the speed)."""
    model = train.create_model(config, config.dataset.num_classes)
    tx = train.create_optimizer(config.optimizer,
                                train.create_learning_rate_fn(config.optimizer, 1000))
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    size = config.preprocess.size
    return model, train.create_train_state(model, tx, init_key, (size, size, 3), mesh), train_key


def placeholder_stats(config: ml_collections.ConfigDict):
    """Per-channel statistics for "standardize" (their values do not change the speed), or None."""
    if config.preprocess.normalize != "standardize":
        return None
    return {"mean": jnp.full((3,), 127.5, jnp.float32), "std": jnp.full((3,), 64.0, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def time_step(call: Callable[[], object], warmup: int, repeats: int, steps: int,
              probe: Callable[[], float] | None = None) -> tuple[list[float], list[float]]:
    """Seconds per call of `call` (which must return what to wait on), `repeats` times over `steps`
    consecutive calls after `warmup` untimed ones; and, if given, `probe()` (the peak FLOP/s) run
    right after each timing, so that each timing has a peak measured at the same moment."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    per_step, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = call()
        jax.block_until_ready(out)
        per_step.append((time.perf_counter() - start) / steps)
        if probe is not None:
            peaks.append(probe())
    return per_step, peaks


def _step_report(seconds: list[float], peaks: list[float], batch: int, flops: float,
                 model_flops_per_image: float, lower_s: float, compile_s: float) -> dict:
    """Images/s and FLOP/s from the median step time; MFU as the median over the timings of each
    timing's FLOP/s over the peak measured beside it (on a shared machine both drift together)."""
    step = statistics.median(seconds)

    def mfu(flops_per_step: float) -> float | None:
        if not peaks:
            return None
        return statistics.median(flops_per_step / (s * p) for s, p in zip(seconds, peaks, strict=True))

    return {
        "images_per_s": batch / step,
        "step_ms": 1e3 * step,
        "step_ms_all": [round(1e3 * s, 2) for s in seconds],
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


def _compile(fn, *args) -> tuple[object, float, float]:
    """(compiled, lower seconds, compile seconds) of the jitted `fn` on `args`."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------
def _offline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.dataset with download switched off: the benchmark never downloads."""
    dataset = copy.deepcopy(config.dataset)
    with dataset.unlocked():
        dataset.download = False
    return dataset


def time_pipeline(feed: data.StreamedFeed, batches: int) -> dict:
    """Images/s of the streamed input pipeline alone (grain reads and decodes, batches put on the
    mesh, nothing stepping), over `batches` batches of epoch 0, and the seconds to the first."""
    start = time.perf_counter()
    first, count = None, 0
    for batch in feed.epoch(0, 0, [1] * min(batches, feed.steps_per_epoch)):
        jax.block_until_ready(batch)
        first = time.perf_counter() if first is None else first
        count += 1
    end = time.perf_counter()
    return {"batches": count, "first_batch_s": first - start,
            "images_per_s": (count - 1) * feed.global_batch / (end - first) if count > 1 else None}


def synthetic_feed(size: int, image_shape, num_classes: int, mesh, seed: int = 0) -> dict:
    """A resident feed whose split is one batch of `size` random images (order 0..size-1, the same
    in every process): every step of the run's own jitted call gathers that same batch."""
    rng = np.random.default_rng(seed)
    return {"images": data.replicated(rng.integers(0, 256, (size, *image_shape), dtype=np.uint8), mesh),
            "labels": data.replicated(rng.integers(0, num_classes, size).astype(np.int32), mesh),
            "order": data.replicated(np.arange(size, dtype=np.int32), mesh)}


def compare_feeds(config: ml_collections.ConfigDict, mesh, state, train_key, stats,
                  split: data.Split, opts: dict) -> tuple[dict, object]:
    """Training as a run trains (`train.jit_train_steps`, config.steps_per_call steps per call) fed
    by the device-resident split, by the streamed pipeline and by a synthetic resident batch, in
    `rounds` alternating rounds of about `compare_steps` steps each; the medians and their ratios."""
    k = config.steps_per_call
    steps_per_epoch = split.num_examples // config.batch_size
    # Each round reads one epoch of each feed: at most its steps, one call of them untimed.
    calls = min(max(1, opts["compare_steps"] // k), steps_per_epoch // k - 1)
    if calls < 1:
        return {"skipped": f"an epoch of {steps_per_epoch} steps is too short for 2 calls of "
                           f"{k} steps"}, state
    fns = {resident: train.jit_train_steps(config, mesh, k, resident) for resident in (True, False)}
    start = time.perf_counter()
    feeds = {"streamed": data.StreamedFeed(split, mesh, config.batch_size, config.seed,
                                           config.dataset.prefetch)}
    report = {"steps_per_call": k, "steps": calls * k, "rounds": opts["rounds"]}
    if data.is_resident(split, config.dataset, mesh):
        feeds["resident"] = data.ResidentFeed(split, mesh, config.batch_size, config.seed)
        report["resident_load_s"] = time.perf_counter() - start  # decode + put on the devices
    sums = train.zero_sums(mesh)
    rates = {name: [] for name in ("synthetic", *feeds)}
    synthetic = synthetic_feed(config.batch_size, split.image_shape, config.dataset.num_classes,
                               mesh)

    def timed(name: str, feed_calls: Iterator[dict], resident: bool) -> None:
        nonlocal state, sums
        state, sums = fns[resident](state, sums, next(feed_calls), train_key, stats)  # untimed
        jax.block_until_ready(state)
        begin = time.perf_counter()
        for feed in feed_calls:
            state, sums = fns[resident](state, sums, feed, train_key, stats)
        jax.block_until_ready(state)
        rates[name].append(calls * k * config.batch_size / (time.perf_counter() - begin))

    for r in range(opts["rounds"]):
        timed("synthetic", iter([synthetic] * (calls + 1)), True)
        for name, feed in feeds.items():
            timed(name, feed.epoch(r, 0, [k] * (calls + 1)), feed.resident)
    for name, values in rates.items():
        report[f"{name}_images_per_s"] = statistics.median(values)
        report[f"{name}_all"] = values
    for name in feeds:
        report[f"{name}_ratio"] = report[f"{name}_images_per_s"] / report["synthetic_images_per_s"]
    return report, state


# ---------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------
def op_names(compiled) -> dict[str, str]:
    """XLA instruction name -> the JAX op it came from ("jit(train_step)/.../Conv_1/conv_...")."""
    return dict(re.findall(r'%(\S+) = .*?metadata=\{op_name="([^"]+)"', compiled.as_text()))


def profile(call: Callable[[], object], compiled, steps: int, directory: Path) -> str:
    """Traces `steps` calls of `call` into `directory` and returns a table of where the time went:
    per step, by forward/backward and JAX primitive (every one, so that a small share is not cut off
    by a neighbour's noise), then the 15 slowest XLA ops by layer."""
    jax.block_until_ready(call())
    with jax.profiler.trace(str(directory)):
        for _ in range(steps):
            jax.block_until_ready(call())
    names = op_names(compiled)
    traces = sorted(directory.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        return f"trace written to {directory} (no trace.json.gz to summarise)"
    events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
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


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def host_description() -> dict:
    """The machine: CPU model, the SIMD flags that matter to XLA:CPU, cores, load average."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                     if line.startswith("flags"))
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                        if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def benchmark(config: ml_collections.ConfigDict, workdir: str | None = None, mesh=None,
              printer: Callable[[str], None] | None = print) -> dict:
    """Runs the benchmark described in the module docstring; returns (and with `workdir` writes
    to `DIR/benchmark.json`) the report."""
    opts = settings(config)
    say = printer or (lambda _: None)
    mesh = train.create_mesh() if mesh is None else mesh
    dtype = train.compute_dtype(config.dtype)
    device = mesh.devices.flat[0]
    num_devices = mesh.devices.size
    report = {"model": config.model.name, "dataset": config.dataset.name,
              "backend": jax.default_backend(), "device_kind": device.device_kind,
              "num_devices": num_devices, "dtype": dtype.name, "batch_size": config.batch_size,
              "eval_batch_size": config.eval_batch_size, "jax": jax.__version__,
              "host": host_description(), "load_average_start": _load(),
              "compilation_cache": jax.config.jax_compilation_cache_dir or None}
    say(f"benchmark: {config.model.name}, {dtype.name}, batch {config.batch_size} on "
        f"{num_devices} x {device.device_kind} ({report['backend']}); 1-min load "
        f"{report['load_average_start']}")

    peak_info, probe = device_peak(dtype.name, mesh, opts)
    report["peak"] = peak_info

    # The steps, built and compiled as a training run builds them.
    data.local_batch_size(config.batch_size, mesh)  # the same errors as a run for a bad batch
    num_classes = config.dataset.num_classes
    model, state, train_key = initial_state(config, mesh)
    size = config.preprocess.size
    train_fn, eval_fn = train.jit_steps(config, mesh)
    image_shape = raw_image_shape(config)
    stats = placeholder_stats(config)
    batch = synthetic_batch(config.batch_size, image_shape, num_classes, mesh)
    report["image_shape"] = list(image_shape)

    with count_compilations() as compilations:
        train_compiled, train_lower_s, train_compile_s = _compile(
            train_fn, state, batch, train_key, stats)
        say(f"train step compiled in {train_lower_s + train_compile_s:.1f}s")
        state_box = [state]

        def train_call():
            state_box[0], sums = train_compiled(state_box[0], batch, train_key, stats)
            return state_box[0]

        train_times = time_step(train_call, opts["warmup"], opts["repeats"], opts["steps"], probe)

        if opts["eval"]:
            eval_batch = synthetic_batch(config.eval_batch_size, image_shape, num_classes, mesh, 1)
            eval_compiled, eval_lower_s, eval_compile_s = _compile(
                eval_fn, state_box[0], eval_batch, stats)
            eval_times = time_step(lambda: eval_compiled(state_box[0], eval_batch, stats),
                                   opts["warmup"], opts["repeats"], opts["steps"], probe)
    forward = model_flops(model, (size, size, 3))
    report["train"] = _step_report(
        *train_times, config.batch_size,
        xla_flops(train_compiled, num_devices, lambda: compile_whole_batch(
            config, mesh, "train", state_box[0], batch, train_key, stats)), 3 * forward,
        train_lower_s, train_compile_s)
    if opts["eval"]:
        report["eval"] = _step_report(
            *eval_times, config.eval_batch_size,
            xla_flops(eval_compiled, num_devices, lambda: compile_whole_batch(
                config, mesh, "eval", state_box[0], eval_batch, stats)), forward,
            eval_lower_s, eval_compile_s)
    peaks = [p for name in ("train", "eval") if name in report
             for p in report[name]["peak_flops_per_s_all"]]
    report["peak"]["flops_per_s"] = statistics.median(peaks) if peaks else None
    report["compilations"] = dict(compilations)
    if opts["profile_steps"] and workdir is not None:
        table = profile(train_call, train_compiled, opts["profile_steps"], Path(workdir) / "profile")
        (Path(workdir) / "profile.txt").write_text(table + "\n")
        report["profile"] = str(Path(workdir) / "profile.txt")
        say(table)
    for name in ("train", "eval"):
        if name in report:
            r = report[name]
            mfu = f"MFU {100 * r['mfu']:.1f}% (model FLOPs: {100 * r['mfu_model']:.1f}%)" \
                if r["mfu"] is not None else "MFU n/a (unknown device peak)"
            say(f"{name} step: {r['images_per_s']:.1f} images/s ({r['step_ms']:.0f} ms/step), "
                f"{r['flops_per_image'] / 1e9:.3f} GFLOP/image (XLA; model "
                f"{r['model_flops_per_image'] / 1e9:.3f}), {r['flops_per_s'] / 1e9:.1f} GFLOP/s, "
                f"{mfu}; compiled in {r['lower_s'] + r['compile_s']:.1f}s")
    if peaks:
        say(f"peak: {report['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s, median of the "
            f"{len(peaks)} measured beside the timings ({report['peak']['source']})")

    # The input pipeline, when the data is there.
    if opts["pipeline"]:
        try:
            split = data.load_split(_offline(config), config.dataset.train_split)
        except UserError as e:
            report["input_pipeline"] = {"skipped": str(e)}
            say(f"input pipeline: skipped ({e})")
        else:
            streamed = data.StreamedFeed(split, mesh, config.batch_size, config.seed,
                                         config.dataset.prefetch)
            pipeline = time_pipeline(streamed, opts["pipeline_batches"])
            report["input_pipeline"] = pipeline
            rate = f"{pipeline['images_per_s']:.0f}" if pipeline["images_per_s"] else "n/a"
            say(f"streamed input pipeline alone: {rate} images/s ({pipeline['batches']} batches, "
                f"{split.workers} read workers; first batch after {pipeline['first_batch_s']:.2f}s)")
            comparison, state_box[0] = compare_feeds(config, mesh, state_box[0], train_key, stats,
                                                     split, opts)
            report["feeds"] = comparison
            if "skipped" in comparison:
                say(f"feeds against synthetic data: skipped ({comparison['skipped']})")
            if "resident_load_s" in comparison:
                say(f"training split decoded and put on the devices in "
                    f"{comparison['resident_load_s']:.1f}s")
            for name in ("resident", "streamed"):
                if f"{name}_ratio" in comparison:
                    say(f"training fed {name}: {comparison[f'{name}_images_per_s']:.1f} images/s "
                        f"against {comparison['synthetic_images_per_s']:.1f} on a synthetic "
                        f"resident batch (ratio {comparison[f'{name}_ratio']:.3f}; "
                        f"{config.steps_per_call} step(s) per call)")
    report["load_average_end"] = _load()
    say(f"1-min load at the end: {report['load_average_end']}")
    if workdir is not None and jax.process_index() == 0:
        path = Path(workdir) / "benchmark.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(report, indent=2) + "\n")
        say(f"wrote {path}")
    return report
