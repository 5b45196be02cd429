"""config.host_memory: launch.py keeps the memory XLA:CPU frees after each step for the next one."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from attn_jax import host_memory, validate
from attn_jax.errors import UserError
from attn_jax.experiment import load_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting, accelerator, glibc, expected", [
    ("auto", False, True, True),  # a CPU run on glibc
    ("auto", True, True, False),  # a GPU or TPU host: its buffers live on the accelerator
    ("auto", False, False, False),  # another C library: mallopt's parameters differ
    ("keep", True, True, True),  # asked for
    ("system", False, True, False),
])
def test_auto_keeps_freed_memory_for_cpu_runs_on_glibc(setting, accelerator, glibc, expected):
    assert host_memory.resolve(setting, accelerator, glibc) is expected


@pytest.mark.parametrize("platforms, expected", [("cpu", False), ("cuda", True),
                                                 ("cuda,cpu", True), ("tpu", True)])
def test_the_requested_platforms_decide_where_jax_computes(monkeypatch, platforms, expected):
    monkeypatch.setattr(host_memory, "_requested_platforms", lambda: platforms)
    monkeypatch.setattr(host_memory, "_installed_plugins", lambda: ["xla_cuda12"])
    assert host_memory.accelerator_installed() is expected


@pytest.mark.parametrize("plugins, expected", [(["xla_cuda12"], True), ([], False)])
def test_without_a_request_an_installed_plugin_decides(monkeypatch, plugins, expected):
    monkeypatch.setattr(host_memory, "_requested_platforms", lambda: "")
    monkeypatch.setattr(host_memory, "_installed_plugins", lambda: plugins)
    assert host_memory.accelerator_installed() is expected


def _config(host_memory_setting: str):
    """The EANet smoke config with `host_memory` set."""
    config = load_module(ROOT / "experiments" / "eanet.py").get_config("smoke")
    with config.unlocked():
        config.host_memory = host_memory_setting
    return config


@pytest.fixture
def before_jax_starts(monkeypatch):
    """`configure` as launch.py calls it, before JAX's backends start."""
    monkeypatch.setattr(host_memory, "backends_started", lambda: False)


def test_keep_is_refused_where_glibc_refuses_a_setting(monkeypatch, before_jax_starts):
    config = _config("keep")
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: False)
    with pytest.raises(UserError, match="glibc refused a mallopt setting"):
        host_memory.configure(config)
    with config.unlocked():
        config.host_memory = "auto"
    monkeypatch.setattr(host_memory, "accelerator_installed", lambda: False)
    assert host_memory.configure(config) == "system"  # "auto" falls back to the allocator as it is


@pytest.mark.parametrize("value", ["on", "", "Keep"])
def test_a_bad_setting_is_refused_naming_the_field(value):
    config = _config(value)
    with pytest.raises(UserError, match="config.host_memory"):
        validate.check(config)


def test_keep_is_refused_without_glibc(monkeypatch, before_jax_starts):
    config = _config("keep")
    monkeypatch.setattr(host_memory, "glibc", lambda: False)
    with pytest.raises(UserError, match="config.host_memory='keep' needs glibc"):
        host_memory.configure(config)


# The start of each script below: host_memory configured from argv[1], before JAX starts.
_CONFIGURED = """
import sys
from attn_jax import host_memory
from attn_jax.experiment import load_module
config = load_module('experiments/eanet.py').get_config('smoke')
with config.unlocked():
    config.host_memory = sys.argv[1]
applied = host_memory.configure(config)
"""

_STEPS = """
import resource
import jax, jax.numpy as jnp
x = jnp.ones((12, 1024, 1024))
step = jax.jit(lambda x: jnp.cumsum(jnp.tanh(x), axis=0)[::2].sum((0, 1)))  # 48 MiB temporary
faults = []
for _ in range(int(sys.argv[2])):  # the heap grows while a step's temporary is still held as the
    # next one starts, for up to 8 steps here, and then stops
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


def _default_allocator_env() -> dict[str, str]:
    """This environment without what else would choose the allocator's behaviour."""
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}


def _run_configured(script: str, setting: str, *args: str) -> list[str]:
    """The words `script` prints, run in a fresh process after `_CONFIGURED` with `setting`, in
    this environment less what else would choose the allocator's behaviour."""
    return subprocess.run([sys.executable, "-c", _CONFIGURED + script, setting, *args], cwd=ROOT,
                          env=_default_allocator_env(), check=True, capture_output=True,
                          text=True).stdout.split()


def _fewest_faults_per_step(setting: str, steps: int) -> tuple[str, int]:
    out = _run_configured(_STEPS, setting, str(steps))
    return out[0], int(out[1])


@pytest.mark.slow  # two processes, 20 steps
@pytest.mark.skipif(not host_memory.glibc(), reason="mallopt's settings are glibc's")
def test_kept_memory_is_reused_by_the_next_step_without_page_faults():
    """What the setting is for: a step's large temporary comes back without faulting its pages in
    again (12,288 4-KiB pages in every step where glibc maps it on its own)."""
    applied, faults = _fewest_faults_per_step("keep", steps=16)
    assert applied == "keep" and faults < 1_000
    applied, faults = _fewest_faults_per_step("system", steps=4)
    assert applied == "system" and faults > 6_000


_HEAP_TOP = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
libc.sbrk.argtypes, libc.malloc.argtypes = [ctypes.c_long], [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
start = libc.sbrk(0)
block = libc.malloc(3 * 2**30)  # address space only: no page of it is touched
if block is None:
    sys.exit("no 3 GiB of address space")
grown = libc.sbrk(0)
libc.free(block)
print(grown - start, libc.sbrk(0) - start)
"""


def _room_for_3_gib() -> str | None:
    """Why this process could not reserve 3 GiB of address space more, or None."""
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and soft < 4 * 2**30:
            return f"an address-space limit of {soft} bytes"
    overcommit = Path("/proc/sys/vm/overcommit_memory")
    if overcommit.exists() and overcommit.read_text().strip() == "2":
        return "strict overcommit (vm.overcommit_memory=2)"
    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") < 4 * 2**30:
        return "under 4 GiB of memory"
    return None


@pytest.mark.skipif(not host_memory.glibc(), reason="mallopt's settings are glibc's")
def test_a_freed_heap_top_larger_than_2_gib_is_kept():
    """The ViT baseline's step frees more than 2 GiB at the heap's top, the largest positive trim
    threshold: "keep" must never trim (glibc's -1), or those pages fault back in every step."""
    if why := _room_for_3_gib():
        pytest.skip(f"the test reserves 3 GiB of address space; this machine has {why}")
    out = _run_configured(_HEAP_TOP, "keep")
    grown, after_free = int(out[0]), int(out[1])
    assert grown > 2 * 2**30, "the 3 GiB block did not come from the heap, as M_MMAP_MAX 0 asks"
    assert after_free == grown, f"the heap gave back {grown - after_free} bytes after the free"
