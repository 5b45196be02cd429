"""attn_jax.compile_cache: JAX's persistent compilation cache, on by default for launch.py's runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from attn_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]
_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
            "jax_persistent_cache_enable_xla_caches")


@pytest.mark.parametrize("environ, expected", [
    ({"ATTN_JAX_COMPILATION_CACHE": "/data/cache"}, "/data/cache"),
    ({"ATTN_JAX_COMPILATION_CACHE": "/data/cache", "JAX_COMPILATION_CACHE_DIR": "/jax"}, "/data/cache"),
    ({"ATTN_JAX_COMPILATION_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": "/jax"}, None),
    ({"ATTN_JAX_COMPILATION_CACHE": "OFF"}, None),
    ({"ATTN_JAX_COMPILATION_CACHE": ""}, None),
    ({"JAX_COMPILATION_CACHE_DIR": "/jax"}, "/jax"),  # JAX's own variable, where ours is unset
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/attn_jax/jax_compilation_cache"),
])
def test_the_environment_chooses_the_folder(environ, expected):
    folder = compile_cache.cache_dir(environ)
    assert (None if folder is None else str(folder)) == expected


def test_by_default_the_folder_is_under_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.cache_dir({}) == tmp_path / ".cache" / "attn_jax" / "jax_compilation_cache"


@pytest.fixture
def jax_cache_settings_restored():
    """JAX's cache options as they were before the test (the test run's own folder)."""
    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_off_turns_the_cache_off(jax_cache_settings_restored):
    assert compile_cache.enable({"ATTN_JAX_COMPILATION_CACHE": "off"}) is None
    assert jax.config.jax_enable_compilation_cache is False


def test_a_folder_that_cannot_be_made_turns_the_cache_off_with_one_line(
        tmp_path, capsys, jax_cache_settings_restored):
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "cache"  # under a file: mkdir fails, also for root
    assert compile_cache.enable({"ATTN_JAX_COMPILATION_CACHE": str(folder)}) is None
    assert jax.config.jax_enable_compilation_cache is False
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: compilation cache off: cannot create {folder}")
    assert "ATTN_JAX_COMPILATION_CACHE=off" in lines[0]


# A fresh process as launch.py starts: the cache enabled, one program compiled; prints what JAX
# reported (hits and misses of the persistent cache) and the folder enable() returned. The tests'
# environment has JAX cache programs of any compile time (conftest), this tiny one too.
_COMPILE_ONCE = """
import json, jax, jax.numpy as jnp, numpy as np
from attn_jax import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compile_cache.enable()
jax.jit(lambda x: jnp.tanh(x) @ x.T)(np.ones((64, 64), np.float32)).block_until_ready()
options = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_enable_xla_caches")
print(json.dumps({"folder": str(folder), "options": [getattr(jax.config, n) for n in options],
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _compile_in_a_fresh_process(folder: Path) -> dict:
    env = {**os.environ, "ATTN_JAX_COMPILATION_CACHE": str(folder)}
    out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_a_second_process_loads_the_program_from_the_folder(tmp_path):
    folder = tmp_path / "new" / "cache"  # made by enable()
    first = _compile_in_a_fresh_process(folder)
    assert first["folder"] == str(folder)
    assert first["options"] == [True, str(folder), "xla_gpu_per_fusion_autotune_cache_dir"]
    assert (first["hits"], first["misses"]) == (0, 1)
    assert any(folder.iterdir()), "nothing was written to the cache folder"
    second = _compile_in_a_fresh_process(folder)
    assert (second["hits"], second["misses"]) == (1, 0)
