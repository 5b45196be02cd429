"""What a workdir's run is: `DIR/run.json`, written by its first launch, checked by every relaunch.

It records the config, the code's commit, the package versions and the devices of each launch, so a
result can be reproduced. A relaunch may change how a run is carried out (logging and checkpoint
cadence, data location and input workers, steps per call, the devices: `MAY_CHANGE`), not what it
computes: any other difference is refused with one line naming the fields, before anything in the
workdir is written.
"""

import json
import subprocess
import time
from importlib import metadata
from pathlib import Path

import jax
import ml_collections
from jax.sharding import Mesh

from attn_jax import atomic
from attn_jax.config import base
from attn_jax.errors import RunFault, UserError
from attn_jax.validate import leaves

RECORD = "run.json"
# Fields a relaunch may change: how the run is carried out, not what it computes.
MAY_CHANGE = ("log_every_steps", "steps_per_call", "unroll_steps", "eval_batch_size",
              "attention_every_epochs", "attention_images", "checkpoint.every_steps",
              "checkpoint.keep", "dataset.data_dir", "dataset.download", "dataset.read_workers",
              "dataset.prefetch", "dataset.resident_limit_mib", "model.impl", "cpu_devices",
              "host_memory", "benchmark.")
# Fields added after runs had been recorded, with the value every earlier run computed with: a record
# without the entry is read with it (no warm start, AdamW, no clipping, no accumulation, no EMA).
ADDED_FIELDS = {"init_from": None, "accumulate_steps": 1, "optimizer.name": "adamw",
                "optimizer.clip_grad_norm": 0.0, "ema.decay": 0.0, "ema.warmup": False,
                # the augmentations of the modern stack, off, with the experiments' other values
                "dataset.repeats": 1, "preprocess.randaugment_ops": 0,
                "preprocess.randaugment_magnitude": 9.0, "preprocess.randaugment_magnitude_std": 0.5,
                "preprocess.erase_prob": 0.0, "preprocess.erase_area": [0.02, 1 / 3],
                "preprocess.erase_aspect": [0.3, 1 / 0.3], "mixup.mixup_alpha": 0.0,
                "mixup.cutmix_alpha": 0.0, "mixup.switch_prob": 0.5, "mixup.prob": 1.0}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain",
            "numpy")


def _commit() -> str | None:
    """The attn_jax checkout's git commit (with "-dirty" for uncommitted changes), if it is one."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def launch_entry(mesh: Mesh) -> dict:
    """This launch: when, the code, the packages and the devices of its mesh."""
    devices = list(mesh.devices.flat)
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": _commit(),
            "versions": _versions(), "process_count": jax.process_count(),
            "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"}


def differences(recorded: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The fields, outside `MAY_CHANGE`, whose values differ between the record and `config`."""
    new = {k: _jsonable(v) for k, v in leaves(config).items()}
    old = {**{k: v for k, v in ADDED_FIELDS.items() if k in new}, **recorded}
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if not k.startswith(MAY_CHANGE) and old.get(k) != new.get(k)]


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def read_record(workdir: Path, fix: str) -> dict:
    """`DIR/run.json`: {"config": {field: value}, "launches": [...]}. A damaged one (not JSON, or
    not such a record) is a `RunFault` naming it and `fix`, how to go on without it."""
    path = Path(workdir) / RECORD
    record = atomic.read_json_object(path, fix)
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("launches"), list):
        raise RunFault(f"{path} is damaged (no \"config\" object or \"launches\" list): {fix}")
    return record


def check_and_record(workdir: Path, config: ml_collections.ConfigDict, mesh: Mesh,
                     resuming: bool) -> None:
    """Writes `DIR/run.json` when a run starts; when it resumes, refuses another run's config, else
    adds this launch to the record (process 0 writes). A start that saved no checkpoint (a crash in
    start-up, say) may be relaunched with another config: that is a new run."""
    path = workdir / RECORD
    record = None
    if resuming and path.exists():
        record = read_record(workdir, "it records the config this run was launched with: put back a "
                                      "good copy, or move it away to resume without that check")
    if record is not None and (changed := differences(record["config"], config)):
        raise UserError(f"{workdir} holds another run ({'; '.join(changed)}): relaunch it with its "
                        f"own config (recorded in {path}), or use another --workdir")
    if jax.process_index() != 0:
        return
    if record is None:
        record = {"config": {k: _jsonable(v) for k, v in leaves(config).items()}, "launches": []}
    record["launches"].append(launch_entry(mesh))
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


def recorded_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a run was launched with (`DIR/run.json`), every field of the base: those the
    record predates at their `ADDED_FIELDS` values where these say what the run computed with, the
    rest (how a run is carried out: attention maps, CPU devices, ...) at the base's defaults."""
    path = Path(workdir) / RECORD
    if not path.exists():
        raise UserError(f"{workdir} has no {RECORD} (the record of the config it ran with): pass "
                        "the config explicitly")
    recorded = read_record(workdir, "pass the config the run was launched with explicitly")["config"]
    flat = {**leaves(base()), **ADDED_FIELDS, **recorded}
    config = ml_collections.ConfigDict()
    for key, value in sorted(flat.items()):
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            if parent not in node:
                node[parent] = ml_collections.ConfigDict()
            node = node[parent]
        node[name] = tuple(value) if isinstance(value, list) else value
    return config
