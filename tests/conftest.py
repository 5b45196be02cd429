"""Test setup: 8 fake CPU devices, so every test exercises the multi-device path."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests (and the launch.py subprocesses they start, which inherit this environment) build the same
# tiny programs many times: a persistent compilation cache compiles each of them once per run. The
# run's own folder, made by pytest's first process (xdist's workers inherit it) and removed at its
# end: no test sees what an earlier run, or the user's runs (attn_jax/compile_cache.py), compiled.
if "PYTEST_XDIST_WORKER" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="attn_jax_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ATTN_JAX_COMPILATION_CACHE"] = _RUN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny and compiling dominates their time: XLA's cheapest optimisation level
# halves the compile of a train step (measured 12.6 s -> 6.3 s) at no cost to what they check.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from attn_jax.experiment import load_module  # noqa: E402
from attn_jax.fast.threefry import use_unrolled_threefry_on_cpu  # noqa: E402

use_unrolled_threefry_on_cpu()  # as launch.py does before any work

ROOT = Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tfds"


def pytest_unconfigure(config):
    """Removes the run's compilation cache (in pytest's first process, after its workers end)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.environ["ATTN_JAX_COMPILATION_CACHE"], ignore_errors=True)


def load_experiment(name: str, arg: str | None = None):
    """`get_config(arg)` of experiments/<name>.py, as launch.py would load it."""
    return load_module(ROOT / "experiments" / f"{name}.py").get_config(arg)


def tiny_patch_convnet_config(**overrides):
    """The tutorial experiment shrunk for tests: 16x16 inputs, dim 16, batch 16, one epoch."""
    config = load_experiment("patch_convnet")
    config.dataset.download = True  # tfds.testing.mock_data fakes the download
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_epochs = 1
    config.log_every_steps = 2
    config.preprocess.size = 16
    config.preprocess.train_resize = 18
    config.preprocess.crop = 16
    config.model.dim = 16
    config.model.depth = 1
    config.model.se_ratio = 4
    config.dataset.read_workers = 0  # decode in the test's process (grain workers: launch.py tests)
    return with_overrides(config, overrides)


def with_overrides(config, overrides: dict):
    """`config` with `overrides` set, by dotted key as --config.KEY=VALUE sets them:
    {"model.dim": 16, "batch_size": 32}. The one override helper of the tests."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def digits_config(data_dir, overrides: dict, experiment: str = "patch_convnet"):
    """`experiment`'s smoke config on the digits prepared in `data_dir`, with `overrides`."""
    config = load_experiment(experiment, "smoke")
    config.dataset.data_dir = str(data_dir)
    return with_overrides(config, overrides)


def in_process_digits_config(data_dir, **overrides):
    """`digits_config` decoding in the test's process (no grain workers), overrides as keywords."""
    return digits_config(data_dir, {"dataset.read_workers": 0, **overrides})


# A tiny PatchConvNet run on the digits: 160 training images (10 steps of 16), one epoch, 16x16
# inputs, a log line every step. The runs of the multi-process and sweep tests.
SMALL_RUN = {"dataset.train_split": "train[:160]", "dataset.val_split": "train[1150:1187]",
             "dataset.test_split": "test[:20]", "batch_size": 16, "eval_batch_size": 16,
             "num_epochs": 1, "log_every_steps": 1, "preprocess.size": 16,
             "preprocess.train_resize": 18, "preprocess.crop": 16, "model.dim": 16}


def small_digits_config(data_dir, overrides=SMALL_RUN):
    """`digits_config` with the small run's overrides (or `overrides`, which usually extend them)."""
    return digits_config(data_dir, overrides)


def tutorial_trunk_config(tie_trunk: bool, depth: int = 2):
    """The tutorial PatchConvNet at dim 16 on 16x16 inputs, its trunk tied (one block) or not."""
    config = load_experiment("patch_convnet")
    config.model.update(dim=16, depth=depth, se_ratio=4, tie_trunk=tie_trunk)
    config.preprocess.size = 16
    return config


def png_size(path):
    """The (width, height) of the PNG at `path`, which must be a whole PNG file."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def inches_to_pixels(inches):
    """The pixel size of a figure of `inches` at attention_maps' resolution."""
    from attn_jax import attention_maps

    return tuple(round(x * attention_maps.DPI) for x in inches)


@pytest.fixture
def tiny_config():
    return tiny_patch_convnet_config


@pytest.fixture(scope="session")
def shared_cifar10() -> Path:
    """../shared/tfds holding a prepared cifar10 train split, or skip."""
    if not (SHARED_TFDS / "cifar10").is_dir():
        pytest.skip(f"real CIFAR-10 not available: {SHARED_TFDS}/cifar10 is absent "
                    "(it sits beside the project in attn_jax's development setup)")
    return SHARED_TFDS


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> Path:
    """A tfds data_dir holding `sklearn_digits` prepared as ArrayRecord, as attn_jax prepares it
    (offline, ~6 s; preparing needs TensorFlow, reading it does not)."""
    return _prepared_digits(tmp_path_factory.mktemp("tfds"), "array_record")


@pytest.fixture(scope="session")
def digits_tfrecord_dir(tmp_path_factory) -> Path:
    """A tfds data_dir holding `sklearn_digits` prepared as TFRecord (tfds' older default)."""
    return _prepared_digits(tmp_path_factory.mktemp("tfds_tfrecord"), "tfrecord")


def _prepared_digits(data_dir: Path, file_format: str) -> Path:
    import tensorflow_datasets as tfds

    import attn_jax.datasets  # noqa: F401

    tfds.builder("sklearn_digits", data_dir=str(data_dir)).download_and_prepare(
        file_format=file_format)
    return data_dir


# Puts a `sitecustomize.py` first on PYTHONPATH that makes TensorFlow look uninstalled to a
# subprocess (importlib's path finder never finds it), as on a JAX-only GPU machine.
NO_TENSORFLOW = """
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _without_tensorflow(cls, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
        return None
    return _find_spec(cls, name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_without_tensorflow)
"""


@pytest.fixture
def no_tensorflow_env(tmp_path) -> dict:
    """The environment of a subprocess in which `import tensorflow` fails as if not installed."""
    site = tmp_path / "no_tensorflow"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TENSORFLOW)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


@contextlib.contextmanager
def preempted_when(logged):
    """Within the block, a run sends itself SIGTERM (as a scheduler preempting it) right after it
    writes a metrics line for which `logged(step, scalars)` is true."""
    import signal

    from attn_jax import metrics_log

    write = metrics_log.MetricsLog.write

    def write_then_preempt(self, step, epoch, scalars):
        write(self, step, epoch, scalars)
        if logged(step, scalars):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics_log.MetricsLog, "write", write_then_preempt)
        yield


def random_batches(n: int, size: int = 16) -> list[dict]:
    """`n` batches of `size` random uint8 32x32 images with labels in 0..9, the same every call."""
    rng = np.random.default_rng(0)
    return [{"images": rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8),
             "labels": rng.integers(0, 10, size).astype(np.int32),
             "mask": np.ones(size, bool)} for _ in range(n)]


def run_steps(config, mesh, batches, evaluated: bool = True):
    """Losses of consecutive train steps on `mesh`, from the same initial state (16x16 inputs, 10
    classes), and the eval metrics of the last state on the first batch (None where not
    `evaluated`: the eval step is then not compiled)."""
    import jax

    from attn_jax import data, optimizer, registry, train
    from attn_jax.state import create_train_state

    model = registry.create_model(config, 10)
    schedule = optimizer.create_learning_rate_fn(config.optimizer, 10)
    tx = optimizer.create_optimizer(config.optimizer, schedule)
    state = create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
    train_fn = train.jit_train_step(config, mesh)
    losses = []
    for batch in batches:
        state, sums = train_fn(state, data.to_global(batch, mesh), jax.random.key(1), None)
        losses.append(float(sums["loss"]) / float(sums["count"]))
    if not evaluated:
        return losses, None
    eval_fn = train.jit_eval_step(config, mesh)
    return losses, train.means(eval_fn(state, data.to_global(batches[0], mesh), None))
