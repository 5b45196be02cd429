"""`--mode=benchmark`: how fast the train and eval steps run on the current devices, and whether the
input pipeline could starve them.

    python launch.py --config=experiments/patch_convnet.py --mode=benchmark [--workdir=DIR]

Measured, in this order, in one process:

1. The peak the model-FLOP utilisation (MFU) is measured against (`peaks.py`): a table of dense
   per-device peaks for GPUs and TPUs (`PEAK_FLOPS`), and on CPU the FLOP/s of a large square
   `jnp.dot` in the compute dtype, timed here: the best of `matmul_sizes` is chosen first, then
   re-timed right after every step timing, and each timing's MFU is its FLOP/s over the peak
   measured beside it (the median of those ratios is reported). A shared machine's speed drifts
   (docs/performance.md#reading-the-numbers); pairing
   each timing with its own peak keeps the ratio honest. XLA:CPU runs one device's program on every
   core of the process, so with several (fake) CPU devices this is the peak of all of them together,
   not of each.
2. The train step and the eval step, ahead-of-time compiled (`train.jit_train_step`: one step on a
   given batch, the step a run's calls are made of, and `train.jit_eval_step`; part 4 times the
   calls themselves), timed on one
   device-resident batch of random uint8 images (synthetic: no input pipeline; `steps.py`):
   `warmup` untimed blocks of `steps` calls and a probe (more, up to `warmup_max`, until two blocks
   in a row fault no host memory in, where `host_memory` keeps freed memory: the heap grows over the
   first steps; the report gives `warmup_blocks` and each timing's `page_faults_all`, per call),
   then `repeats` timings of `steps` calls each; the median per step gives images/s. FLOPs per image
   come from XLA's cost analysis of the step (every op it keeps, element-wise ones included, a
   multiply-add as 2), compiled with the model's reference layers (`flops.py`: the fast layers
   compute attention a few examples at a time on CPU, a loop whose body XLA counts once): `mfu` is
   those FLOP/s over the peak. `mfu_model` counts model FLOPs instead, the usual convention: the
   convolutions and matrix products of one forward pass (`model_flops`), three times for a train
   step, once for eval.
3. The streamed input pipeline alone (`data.StreamedFeed`: grain workers read and decode, batches
   put on the mesh, nothing stepping) over `pipeline_batches` batches (`feeds.py`).
4. The feeds against synthetic data: training as a run trains (`train.jit_train_call`,
   config.steps_per_call steps per call), fed by the device-resident split (when it fits; the time
   to decode it and put it on the devices is reported), by the streamed pipeline (started before
   the timing, as in a run) and by one synthetic resident batch, in `rounds` alternating rounds of
   about `compare_steps` steps; the ratios of the median images/s say what each feed costs.

5. With `profile_steps` > 0 and a workdir, a `jax.profiler` trace of that many train steps in
   `DIR/profile` (TensorBoard's profile plugin or Perfetto read it) and, where the trace names XLA's
   ops (XLA:CPU does), the time per step by forward/backward and op kind and the slowest ops with
   the layer each belongs to (`profile.txt`; `profile.py`).

Parts 3 and 4 need the dataset prepared in config.dataset.data_dir: the benchmark never downloads,
and skips them (saying why) otherwise. Nothing writes unless `workdir` is given; then
`DIR/benchmark.json` holds everything printed, with the machine (`host.py`), what
`host_memory.configure` set ("keep", "system"; null where launch.py did not run it) and the number of
compilations of each step (`compilations.py`). Knobs: `config.benchmark.*` (attn_jax/config.py).
"""

import functools
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from attn_jax import atomic, data, host_memory, registry, train
from attn_jax.bench import feeds, flops, host, peaks, profile, steps
from attn_jax.bench.compilations import count_compilations
from attn_jax.errors import UserError

Say = Callable[[str], None]


def run(config: ml_collections.ConfigDict, workdir: str | None = None, mesh=None,
        printer: Say | None = print) -> dict:
    """Runs the benchmark described in the module docstring; returns (and with `workdir` writes
    to `DIR/benchmark.json`) the report."""
    opts = config.benchmark.to_dict()
    say = printer or (lambda _: None)
    mesh = train.create_mesh() if mesh is None else mesh
    report = _describe(config, mesh, say)
    report["peak"], probe = peaks.device_peak(report["dtype"], mesh, opts)
    stepper = _time_steps(config, mesh, opts, probe, report, say)
    if opts["profile_steps"] and workdir is not None:
        _profile(stepper, opts["profile_steps"], Path(workdir), report, say)
    _print_steps(report, say)
    if opts["pipeline"]:
        _time_feeds(config, mesh, stepper, opts, report, say)
    report["load_average_end"] = host.load_average()
    say(f"1-min load at the end: {report['load_average_end']}")
    if workdir is not None and jax.process_index() == 0:
        path = Path(workdir) / "benchmark.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(report, indent=2) + "\n")
        say(f"wrote {path}")
    return report


def _describe(config: ml_collections.ConfigDict, mesh, say: Say) -> dict:
    """The report's first fields: what is benchmarked, on what, and the load at the start."""
    device = mesh.devices.flat[0]
    report = {"model": config.model.name, "dataset": config.dataset.name,
              "backend": jax.default_backend(), "device_kind": device.device_kind,
              "num_devices": mesh.devices.size, "dtype": registry.compute_dtype(config.dtype).name,
              "batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
              "jax": jax.__version__, "host": host.host_description(),
              "host_memory": host_memory.APPLIED,
              "load_average_start": host.load_average(),
              "compilation_cache": jax.config.jax_compilation_cache_dir or None}
    say(f"benchmark: {config.model.name}, {report['dtype']}, batch {config.batch_size} on "
        f"{report['num_devices']} x {device.device_kind} ({report['backend']}); 1-min load "
        f"{report['load_average_start']}")
    return report


def _time_steps(config: ml_collections.ConfigDict, mesh, opts: dict, probe, report: dict,
                say: Say) -> steps.Stepper:
    """Part 2: the steps built and compiled as a training run builds them, timed, their FLOPs
    counted; fills report's "image_shape", "train", "eval" and "compilations". Returns the train
    stepper, whose state the later parts train on."""
    data.local_batch_size(config.batch_size, mesh)  # the same errors as a run for a bad batch
    model, state, train_key = steps.initial_state(config, mesh)
    train_fn, eval_fn = train.jit_train_step(config, mesh), train.jit_eval_step(config, mesh)
    image_shape = steps.raw_image_shape(config)
    stats = steps.placeholder_stats(config)
    batch = steps.synthetic_batch(config.batch_size, image_shape, config.dataset.num_classes, mesh)
    report["image_shape"] = list(image_shape)
    # Warm-up past `warmup` only where the heap grows and then settles: with glibc's default
    # behaviour every step faults its temporaries in, and no warm-up would end that.
    warmup_max = opts["warmup_max"] if host_memory.APPLIED == "keep" else 0
    timing = (opts["warmup"], opts["repeats"], opts["steps"], probe, warmup_max)
    with count_compilations() as compilations:
        train_compiled, *train_build = steps.compile_step(train_fn, state, batch, train_key, stats)
        say(f"train step compiled in {train_build[0] + train_build[1]:.1f}s")
        stepper = steps.Stepper(train_compiled, state, batch, train_key, stats)
        train_times = steps.time_step(stepper, *timing)
        if opts["eval"]:
            eval_batch = steps.synthetic_batch(config.eval_batch_size, image_shape,
                                               config.dataset.num_classes, mesh, 1)
            eval_compiled, *eval_build = steps.compile_step(eval_fn, stepper.state, eval_batch, stats)
            eval_times = steps.time_step(lambda: eval_compiled(stepper.state, eval_batch, stats),
                                         *timing)
    forward = flops.model_flops(registry.create_model(config, config.dataset.num_classes,
                                                      impl="reference"),
                                (config.preprocess.size, config.preprocess.size, 3))
    count = functools.partial(flops.xla_flops, config=config, num_devices=mesh.devices.size)
    report["train"] = steps.step_report(
        *train_times, config.batch_size,
        count(train_fn, train_compiled, stepper.state, batch, train_key, stats), 3 * forward,
        *train_build)
    if opts["eval"]:
        report["eval"] = steps.step_report(
            *eval_times, config.eval_batch_size,
            count(eval_fn, eval_compiled, stepper.state, eval_batch, stats), forward, *eval_build)
    measured = _measured_peaks(report)
    report["peak"]["flops_per_s"] = statistics.median(measured) if measured else None
    if measured:  # the spread, to judge a comparison across runs (a shared CPU drifts)
        report["peak"]["range"] = [min(measured), max(measured)]
    report["compilations"] = dict(compilations)
    return stepper


def _measured_peaks(report: dict) -> list[float]:
    """Every peak measured beside a step timing, train's then eval's."""
    return [p for name in ("train", "eval") if name in report
            for p in report[name]["peak_flops_per_s_all"]]


def _profile(stepper: steps.Stepper, num_steps: int, workdir: Path, report: dict, say: Say) -> None:
    """Part 5: the trace of `num_steps` train steps in DIR/profile, its table in DIR/profile.txt."""
    table = profile.trace_steps(stepper, stepper.compiled, num_steps, workdir / "profile")
    (workdir / "profile.txt").write_text(table + "\n")
    report["profile"] = str(workdir / "profile.txt")
    say(table)


def _print_steps(report: dict, say: Say) -> None:
    """The steps' lines, then the peak's."""
    for name in ("train", "eval"):
        if name in report:
            say(steps.format_step(name, report[name]))
    if measured := _measured_peaks(report):
        low, high = report["peak"]["range"]
        say(f"peak: {report['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s, median of the "
            f"{len(measured)} measured beside the timings, range {low / 1e9:.1f}-{high / 1e9:.1f} "
            f"({report['peak']['source']})")


def _time_feeds(config: ml_collections.ConfigDict, mesh, stepper: steps.Stepper, opts: dict,
                report: dict, say: Say) -> None:
    """Parts 3 and 4, when the data is there: fills report's "input_pipeline" and "feeds"."""
    try:
        split = data.load_split(feeds.offline(config), config.dataset.train_split)
    except UserError as e:
        report["input_pipeline"] = {"skipped": str(e)}
        say(f"input pipeline: skipped ({e})")
        return
    streamed = data.StreamedFeed(split, mesh, config.batch_size, config.seed, config.dataset.prefetch)
    pipeline = report["input_pipeline"] = feeds.time_pipeline(streamed, opts["pipeline_batches"])
    rate = f"{pipeline['images_per_s']:.0f}" if pipeline["images_per_s"] else "n/a"
    say(f"streamed input pipeline alone: {rate} images/s ({pipeline['batches']} batches, "
        f"{split.workers} read workers; first batch after {pipeline['first_batch_s']:.2f}s)")
    _, train_key, stats = stepper.args
    comparison, stepper.state = feeds.compare_feeds(config, mesh, stepper.state, train_key, stats,
                                                    split, opts)
    report["feeds"] = comparison
    if "skipped" in comparison:
        say(f"feeds against synthetic data: skipped ({comparison['skipped']})")
    if "resident_load_s" in comparison:
        say(f"training split decoded and put on the devices in {comparison['resident_load_s']:.1f}s")
    for name in ("resident", "streamed"):
        if f"{name}_ratio" in comparison:
            say(f"training fed {name}: {comparison[f'{name}_images_per_s']:.1f} images/s "
                f"against {comparison['synthetic_images_per_s']:.1f} on a synthetic "
                f"resident batch (ratio {comparison[f'{name}_ratio']:.3f}; "
                f"{config.steps_per_call} step(s) per call)")
