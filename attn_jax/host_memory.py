"""Keep freed host memory for reuse on CPU runs (`config.host_memory`), set before JAX starts.

XLA:CPU allocates a step's temporary buffers with `malloc` when the step starts and frees them
when it ends: 1,232 MiB for the tutorial PatchConvNet's train step at batch 128. glibc serves an
allocation that large with `mmap` and returns it to the kernel with `munmap` when freed, so every
step faults each of those pages back in, and the kernel zeroes each one, a large share of the
step's time (docs/performance.md#freed-host-memory-kept).
Three `mallopt` settings keep the memory in the process instead, so the next step reuses it:

- `M_MMAP_MAX` 0: large allocations come from the heap, not from their own mappings;
- `M_TRIM_THRESHOLD` -1, glibc's value for "never": the heap's free top is not given back after a
  step. (Its largest positive value, 2 GiB, is not enough: the ViT baseline's step frees a heap top
  larger than that, and then faults its pages back in on many steps.)
- `M_ARENA_MAX` 1: XLA's threads allocate from that one heap (glibc gives other threads arenas of
  at most 64 MiB, which map anything larger on their own whatever `M_MMAP_MAX` says). It must be set
  before JAX starts its threads: a thread keeps the arena it first allocated from.

The cost (docs/performance.md#freed-host-memory-kept): a process holds on to its heap until it
exits, as a caching allocator (tcmalloc, or JAX's own on GPUs) does, and the heap grows to several
steps' temporaries before it stops growing (glibc cannot always place a step's buffers in the space
the previous step freed).

The rule, `resolve`: "auto" keeps freed memory where JAX will compute on the CPU and the C library
is glibc, and leaves the allocator alone where an accelerator is installed (a GPU or TPU plugin of
JAX, or `JAX_PLATFORMS` naming one: the step's buffers live on the accelerator, and the host's
threads feed it) or under another C library. "keep" asks for it (on glibc), "system" never. Only how
fast a run goes changes, never what it computes.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

import ml_collections

from attn_jax.errors import UserError
from attn_jax.jax_runtime import backends_started

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))  # -1: never trim
# JAX's accelerator plugins that do not register a "jax_plugins" entry point
_ACCELERATOR_MODULES = ("libtpu",)


def glibc() -> bool:
    """Whether this process runs on glibc, whose `mallopt` takes the settings above."""
    return platform.libc_ver()[0] == "glibc"


def accelerator_installed() -> bool:
    """Whether JAX will compute on an accelerator, judged without starting JAX's backends: the
    platforms JAX was told to use naming one, else a GPU or TPU plugin installed."""
    platforms = _requested_platforms()
    if platforms:
        return any(name.strip() not in ("", "cpu") for name in platforms.split(","))
    return bool(_installed_plugins())


def _requested_platforms() -> str:
    """`jax.config.jax_platforms` (JAX reads `JAX_PLATFORMS` into it on import), or the variable."""
    import jax

    return jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")


def _installed_plugins() -> list[str]:
    """JAX's accelerator plugins installed here: the modules of its `jax_plugins` namespace package
    (the CUDA and ROCm plugins), its "jax_plugins" entry points, and libtpu."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins

        names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    return names + [name for name in _ACCELERATOR_MODULES if importlib.util.find_spec(name)]


def resolve(setting: str, on_accelerator: bool, on_glibc: bool) -> bool:
    """config.host_memory -> whether to keep freed memory: "keep" on glibc, "auto" on glibc where
    JAX computes on the CPU, "system" never."""
    if setting == "system" or not on_glibc:
        return False
    return setting == "keep" or not on_accelerator


def keep_freed_memory() -> bool:
    """Applies the three `mallopt` settings; True where glibc took all of them."""
    libc = ctypes.CDLL("libc.so.6")
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)


APPLIED: str | None = None  # what `configure` did in this process: "keep", "system" or None


def configure(config: ml_collections.ConfigDict) -> str | None:
    """Sets the allocator from `config.host_memory` before JAX's backends start; returns "keep"
    (freed memory kept), "system" (left alone), or None where JAX had already started."""
    global APPLIED
    if backends_started():
        return None
    on_glibc, setting = glibc(), config.get("host_memory", "auto")
    if setting == "keep" and not on_glibc:
        raise UserError(f"config.host_memory='keep' needs glibc's malloc; this C library is "
                        f"{platform.libc_ver()[0] or 'not glibc'}: set it to 'auto' or 'system'")
    keep = resolve(setting, accelerator_installed(), on_glibc)
    if keep and not keep_freed_memory():
        if setting == "keep":
            raise UserError("config.host_memory='keep': glibc refused a mallopt setting; set it to "
                            "'auto' or 'system'")
        keep = False  # "auto": the allocator as it is
    APPLIED = "keep" if keep else "system"
    return APPLIED
