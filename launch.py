r"""The one entry point of attn_jax.

    python launch.py --config=experiments/patch_convnet.py --workdir=DIR [--config.KEY=VALUE ...]
    python launch.py --config=experiments/patch_convnet.py:smoke --workdir=DIR
    python launch.py --config=experiments/patch_convnet.py --mode=summary
    python launch.py --config=experiments/patch_convnet.py --workdir=DIR --mode=attend --image=PATH
    python launch.py --config=experiments/patch_convnet.py --mode=benchmark [--workdir=DIR]
    python launch.py --config=experiments/eanet.py --sweep [--point=K | --collect | --dry_run] --workdir=DIR
"""

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from attn_jax import cli, launch_flags

flags.adopt_module_key_flags(launch_flags)  # --help lists them as this program's flags
_ON_DEVICES = ("train", "eval", "attend", "benchmark")  # the modes that run steps, and say on what


def main(argv: list[str]) -> None:
    # The console gets attn_jax's own lines: it prints its warnings and errors itself, while tfds
    # warns "OpenCV is not installed" at every launch and orbax logs each failed write with its
    # traceback (a full disk printed ~450 lines).
    logging.set_verbosity(logging.FATAL)
    if (error := launch_flags.check_flags(argv)) is not None:
        cli.fail(error)
    config, point = launch_flags.CONFIG.value, None  # point: the sweep.Point of --sweep --point
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])  # path[:arg]
    overrides = config_flags.get_override_values(flags.FLAGS["config"])  # --config.KEY=VALUE, by key
    try:
        from attn_jax import compile_cache, distributed, jax_runtime, sweep, validate, versions
        from attn_jax.fast.threefry import use_unrolled_threefry_on_cpu

        if launch_flags.POINT.value is not None:
            point = sweep.Point.select(config_arg, launch_flags.POINT.value, Path(launch_flags.WORKDIR.value))
            sweep.apply(config, point.overrides)  # its overrides, validated with the rest
        validate.check(config)  # every value, before any work
        versions.warn_if_untested()  # one line naming a dependency outside the tested versions
        compile_cache.enable()  # JAX's persistent compilation cache, before anything compiles
        jax_runtime.set_collective_timeouts()  # a busy machine slows a run, never aborts it
        use_unrolled_threefry_on_cpu()  # dropout masks at GPU speed on CPU: the same bits, faster
        # the modes that train; a sweep's parent only starts its points, each its own launch
        if ((launch_flags.MODE.value in ("train", "benchmark") and not launch_flags.SWEEP.value)
                or point is not None):
            from attn_jax import host_memory
            from attn_jax.cpu_devices import split_host

            single = not launch_flags.DISTRIBUTED.value and (launch_flags.NUM_PROCESSES.value or 1) == 1
            split_host(config, single_process=single)  # before anything starts JAX's devices
            host_memory.configure(config)  # before JAX starts its threads

        distributed.initialize(launch_flags.COORDINATOR.value, launch_flags.NUM_PROCESSES.value,
                               launch_flags.PROCESS_ID.value, launch_flags.DISTRIBUTED.value)
        # the modes that run steps, not a sweep's parent
        if launch_flags.MODE.value in _ON_DEVICES and (not launch_flags.SWEEP.value or point is not None):
            jax_runtime.say_devices()  # "JAX 0.12.1 on gpu: 1 device (NVIDIA H100 80GB HBM3)"
        if point is not None:
            if point.start():  # False: finished already
                _train(config, point.dir, {**overrides, **point.hparams}, point)
        elif launch_flags.SWEEP.value:
            extra = [f"--config.{k}={v}" for k, v in overrides.items()]
            sweep.launch(config_arg, Path(launch_flags.WORKDIR.value), extra, launch_flags.DRY_RUN.value,
                         launch_flags.COLLECT.value)
        elif launch_flags.MODE.value == "train":
            _train(config, launch_flags.WORKDIR.value, overrides)
        else:
            from attn_jax import modes  # the modes other than training

            cli.exit_on_signals(launch_flags.MODE.value)  # training handles SIGTERM and SIGINT itself
            MODES[launch_flags.MODE.value](modes, config)
        distributed.shutdown()
    except Exception as e:  # a bad input, a full disk: one line, not a traceback
        cli.exit_on_known_error(e, point, _training_workdir(point))
        raise


def _training_workdir(point) -> str | None:
    """The workdir of the run this launch trains (a sweep point's, or --workdir's), else None."""
    if point is not None:
        return str(point.dir)
    training = launch_flags.MODE.value == "train" and not launch_flags.SWEEP.value
    return launch_flags.WORKDIR.value if training else None


def _train(config, workdir, hparams: dict, point=None) -> None:
    """Trains in `workdir` (a sweep point's, with `point`); `hparams` for TensorBoard: the overrides."""
    from attn_jax.train import TrainingDiverged, train_and_evaluate

    try:
        train_and_evaluate(config, str(workdir), hparams=hparams)
    except TrainingDiverged as e:
        cli.fail(str(e), status=1, point=point)


def _evaluate(modes, config) -> None:
    metrics = modes.evaluate_checkpoint(config, launch_flags.WORKDIR.value, launch_flags.CHECKPOINT.value,
                                        params=launch_flags.PARAMS.value)
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def _attend(modes, config) -> None:
    for result in modes.attend(config, launch_flags.WORKDIR.value, launch_flags.IMAGE.value,
                               launch_flags.CHECKPOINT.value, params=launch_flags.PARAMS.value):
        print(modes.format_result(result))


def _import(modes, config) -> None:
    path = modes.import_weights(config, launch_flags.WORKDIR.value, launch_flags.WEIGHTS.value)
    print(f"imported {launch_flags.WEIGHTS.value} into {path}: evaluate it with --mode=eval, or fine-tune "
          f"from it with --config.init_from={launch_flags.WORKDIR.value}")


def _export(modes, config) -> None:
    path = modes.export_weights(config, launch_flags.WORKDIR.value, launch_flags.WEIGHTS.value,
                                launch_flags.CHECKPOINT.value, launch_flags.PARAMS.value)
    print(f"wrote {path}: the official PatchConvNet state_dict (torch.load, load_state_dict)")


# Every --mode but train -> what it runs, a function of attn_jax.modes (imported only for these: it
# loads the models) and of the config.
MODES = {"eval": _evaluate, "attend": _attend, "import": _import, "export": _export,
         "summary": lambda modes, config: modes.summarize(config),
         "benchmark": lambda modes, config: modes.benchmark(config, launch_flags.WORKDIR.value)}

if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
