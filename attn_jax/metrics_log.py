"""Run outputs: console lines, `metrics.jsonl`, TensorBoard events, `config.json`, summaries.

Only process 0 writes; the other processes of a multi-host run stay silent.
"""

import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary

from attn_jax import atomic
from attn_jax.errors import RunFault


def format_duration(seconds: float) -> str:
    """12345 -> '3h25m45s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes:02d}m" if hours or minutes else "") + \
        f"{secs:02d}s"


def _records(path: Path, warn: bool = True) -> list[dict]:
    """The records of `path` (none if it is missing). A torn last line (a crash in the middle of
    writing it) is dropped, with a warning if `warn`; any other line that is no record is a
    `RunFault` naming it."""
    if not path.exists():
        return []
    # Decoded leniently: a line of bytes that are no text is one more line that is no record.
    lines = [line for line in path.read_bytes().decode(errors="replace").splitlines()
             if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number < len(lines):
            raise RunFault(f"{path} line {number} is not JSON of a step's metrics: "
                           "repair or remove that line, or use another --workdir")
        elif warn:
            print(f"warning: dropped the torn last line of {path} (a crash while writing it)",
                  flush=True)
    return records


def _lines_up_to(path: Path, step: int) -> list[dict]:
    """The records of `path` with record["step"] <= step, test results excluded."""
    return [r for r in _records(path)
            if r["step"] <= step and not any(k.startswith("test/") for k in r)]


def check_readable(workdir: Path) -> None:
    """Refuses (the `RunFault` of `_records`) a `metrics.jsonl` that a resumed run could not
    continue; reads only, so a launch checks it before writing anything."""
    _records(Path(workdir) / "metrics.jsonl", warn=False)


class MetricsLog:
    """Writes scalars as JSON lines and TensorBoard events, and remembers the latest of each."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict,
                 resume_step: int | None = None):
        """Starts `metrics.jsonl` afresh, or, resuming from a checkpoint at `resume_step`, keeps the
        lines up to that step (dropping those a crashed run wrote after it, and any test line)."""
        self.workdir = Path(workdir)
        self.is_writer = jax.process_index() == 0
        self._latest: dict[str, float] = {}
        if self.is_writer:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.write_json("config.json", config.to_dict())
            path = self.workdir / "metrics.jsonl"
            kept = _lines_up_to(path, resume_step) if resume_step is not None else []
            for record in kept:  # every scalar, learning_rate too, as `write` remembers them
                self._latest.update({k: v for k, v in record.items() if k not in ("step", "epoch")})
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._jsonl = open(path, "a")  # noqa: SIM115
        # TensorBoard events by tensorboardX: clu's writers import TensorFlow. Resuming, TensorBoard
        # is told to drop the events a crashed launch wrote after the checkpoint (`purge_step`), as
        # metrics.jsonl drops their lines: each step is shown once, with the values the run kept.
        purge = None if resume_step is None else resume_step + 1
        self._tensorboard = (SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)
                             if self.is_writer else None)

    def info(self, message: str) -> None:
        """A console line (process 0 only)."""
        if self.is_writer:
            print(message, flush=True)
        logging.info(message)

    def write(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """One `metrics.jsonl` line {"step", "epoch", **scalars} and the same TensorBoard scalars."""
        self._latest.update(scalars)
        if not self.is_writer:
            return
        record = {"step": step, "epoch": epoch, **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def write_image(self, step: int, name: str, image) -> None:
        """One uint8 RGB image [H, W, 3] to TensorBoard as `name` at `step` (process 0 only)."""
        if self.is_writer:
            self._tensorboard.add_image(name, np.asarray(image, np.uint8), step, dataformats="HWC")
            self._tensorboard.flush()

    def latest(self) -> dict[str, float]:
        """The most recent value of every scalar written."""
        return dict(self._latest)

    def epoch_line(self) -> str:
        """'train loss 1.23 top1 45.6% | val loss ... top1 ... top5 ...' from the latest values."""
        parts = []
        for prefix in ("train", "val"):
            if f"{prefix}/loss" in self._latest:
                parts.append(f"{prefix} loss {self._latest[prefix + '/loss']:.4f} "
                             f"top1 {100 * self._latest[prefix + '/top1']:.2f}% "
                             f"top5 {100 * self._latest[prefix + '/top5']:.2f}%")
        return " | ".join(parts)

    def write_hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """TensorBoard's HParams summary of this run (process 0 only): `hparams` (values other than
        numbers, strings and booleans as text) and, as its metrics, the scalar tags of `metrics`,
        whose values TensorBoard reads from this run's own scalars. The run is the session, so
        `tensorboard --logdir=SWEEP_DIR` compares the points in the HParams dashboard."""
        if not self.is_writer:
            return
        clean = {k: v if isinstance(v, bool | int | float | str) else str(v)
                 for k, v in hparams.items()}
        metric_tags = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        for summary in hparams_summary(clean, metric_tags):  # experiment, session start and end
            self._tensorboard.file_writer.add_summary(summary)
        self._tensorboard.flush()

    def write_json(self, name: str, obj: dict) -> None:
        """`workdir/name` as indented JSON (process 0 only); NaN and infinities become null."""
        if self.is_writer:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in obj.items()}
            atomic.write_text(self.workdir / name, json.dumps(clean, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self.is_writer:
            self._jsonl.close()
            self._tensorboard.close()
