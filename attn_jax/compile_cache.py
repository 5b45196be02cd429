"""JAX's persistent compilation cache for launch.py's runs, on by default.

Every launch compiles the same programs before its first step (the train and eval steps, the
initialisation); with the cache, a relaunch of the same experiment (a resumed run, the same command
again) loads them from disk instead. Cold and warm start-up times:
docs/performance.md#start-up-and-the-compilation-cache.

The folder, `cache_dir`: `$ATTN_JAX_COMPILATION_CACHE` where set ("" or "off": no cache), else
JAX's own `JAX_COMPILATION_CACHE_DIR` where set, else `$XDG_CACHE_HOME/attn_jax/jax_compilation_cache`
(`~/.cache/...` without XDG_CACHE_HOME). On a GPU, XLA's autotuning results go in a subfolder of it,
so a warm start also skips the autotuning of its fusions (process 0 of a run writes them).

JAX caches the programs that took at least a second to compile (its default; its variable
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS changes it): caching every small program as well did not
shorten the smoke run's start-up measurably, and with the default the points of a sweep, whose
programs differ, do not write entries that nothing will read.

One folder serves any number of runs, processes, models and versions: JAX keys each entry by the
program, the JAX and XLA versions, the flags and the devices, and XLA:CPU refuses (and recompiles)
code compiled for another CPU. Nothing trims it: delete the folder to reclaim its space.
"""

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "ATTN_JAX_COMPILATION_CACHE"
_OFF = ("", "off")
# XLA's caches that JAX keeps beside its own: the GPU autotuning results (only process 0 writes them)
_XLA_CACHES = "xla_gpu_per_fusion_autotune_cache_dir"


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache folder `environ` asks for (see the module's docstring), or None for no cache."""
    if ENV in environ:
        value = environ[ENV].strip()
        return None if value.lower() in _OFF else Path(value).expanduser()
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(base) / "attn_jax" / "jax_compilation_cache"


def _unusable(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache (it cannot be made, or written), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {folder} ({e.strerror or e})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def enable(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turns JAX's persistent compilation cache on in `cache_dir(environ)` (or off), for the
    programs compiled from now on: call it before JAX compiles anything. Returns the folder, or None
    where the cache is off; a folder that cannot be written turns it off with one warning line."""
    folder = cache_dir(environ)
    if folder is not None and (problem := _unusable(folder)):
        print(f"warning: compilation cache off: {problem}; set {ENV}=DIR to use another folder, "
              f"or {ENV}=off", file=sys.stderr, flush=True)
        folder = None
    compilation_cache.reset_cache()  # JAX opens its cache at the first compile after this
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_enable_xla_caches", _XLA_CACHES)
    return folder
