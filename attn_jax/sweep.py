"""Hyperparameter sweeps: every point of an experiment's `get_sweep()` in its own workdir.

An experiment file may define `get_sweep(arg=None)` returning a list of points, each a dict with a
`name` and the config overrides of that point, e.g.
`{"name": "self-seed1", "model.attention": "self", "seed": 1}`. Overrides of `seed` make repeats:
points that differ only in their seed form one group in the report (mean ± std over seeds).

`run` launches `launch.py --sweep --point=<name>` once per point, each training in `DIR/<name>/`,
skipping finished points (those with a `summary.json`) and resuming interrupted ones (from their
checkpoints); a SIGTERM or SIGINT to it is passed on to the point training (`PassedOn`); `commands`
gives the equivalent plain command lines for a cluster scheduler. One point (`--point`, `Point`)
may run as its own job, many at once sharing DIR: a point writes only inside its own `DIR/<name>/`
(its one-line error, if it fails, in `DIR/<name>/failed.json`), and only the sequential `run` and
`--collect` write the shared report. `write_report` tabulates the finished points in `DIR/sweep.md`
and `DIR/sweep.csv`; `state` says where every other point stands.
"""

import contextlib
import csv
import dataclasses
import io
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from attn_jax import atomic, run_guard, workdir_lock
from attn_jax.errors import RunFault, UserError
from attn_jax.experiment import load_module

LAUNCH = Path(__file__).resolve().parents[1] / "launch.py"
FAILED = "failed.json"  # in DIR/<point>/: the last error line of the point's latest failed launch
COLUMNS = ("val/top1", "val/top5", "test/top1", "test/top5", "num_params", "train_images_per_s")


def points(config_arg: str) -> list[dict]:
    """The sweep points of the experiment `path[:arg]`, validated."""
    path, _, arg = config_arg.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"{path} defines no get_sweep(): --sweep needs an experiment that does")
    sweep = module.get_sweep(arg or None)
    names = [p.get("name") for p in sweep]
    if not sweep or None in names or len(set(names)) != len(names):
        raise UserError(f"get_sweep() of {path} must return points with distinct 'name's")
    return sweep


def select(config_arg: str, which: str) -> dict:
    """The point `which` names: its index in get_sweep() or its name."""
    sweep = points(config_arg)
    names = [p["name"] for p in sweep]
    if which.strip().lstrip("-").isdigit():
        index = int(which)
        if 0 <= index < len(sweep):
            return sweep[index]
    elif which in names:
        return sweep[names.index(which)]
    raise UserError(f"--point={which}: no such sweep point; the valid ones are 0..{len(sweep) - 1} "
                    f"or a name: {', '.join(names)}")


def apply(config, point: dict) -> None:
    """Sets the overrides of `point` on `config`, as --config.KEY=VALUE flags would."""
    for key, value in point.items():
        if key == "name":
            continue
        node = config
        try:
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            text = str(e).strip("'\" ").splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"sweep point {point['name']}: cannot set config.{key}={value!r} "
                            f"({text}): fix get_sweep()") from None


def record_failure(point_dir: Path, message: str) -> None:
    """`DIR/<point>/failed.json`: the error line of this failed launch (the latest failure only)."""
    point_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(point_dir / FAILED, json.dumps(
        {"error": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def clear_failure(point_dir: Path) -> None:
    """A relaunch forgets the previous launch's failure (it fails anew, or it does not)."""
    (point_dir / FAILED).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point trained by its own launch (`--sweep --point`) in `dir`, `WORKDIR/<name>`,
    where the error line of a failed launch is recorded for `--collect`."""

    overrides: dict  # as get_sweep() gives it: its name and config overrides
    dir: Path

    @classmethod
    def select(cls, config_arg: str, which: str, workdir: Path) -> "Point":
        """The point `which` names (an index in get_sweep() or a name), trained in `workdir`."""
        point = select(config_arg, which)
        return cls(point, workdir / point["name"])

    @property
    def name(self) -> str:
        return self.overrides["name"]

    @property
    def hparams(self) -> dict:
        """Its config overrides, by dotted key: {"model.dim": 8, "seed": 1}."""
        return {k: v for k, v in self.overrides.items() if k != "name"}

    def start(self) -> bool:
        """Whether to train it, as the sequential sweep decides: a finished point is skipped; otherwise
        process 0 says whether it starts or resumes and forgets the previous launch's failure."""
        import jax

        if (self.dir / "summary.json").exists():
            print(f"sweep: {self.name} is finished, skipping", flush=True)
            return False
        if jax.process_index() == 0:
            state = "resuming" if (self.dir / "checkpoints").exists() else "starting"
            print(f"sweep: {state} {self.name}", flush=True)
            clear_failure(self.dir)
        return True

    def record_failure(self, message: str) -> None:
        """The error line of this launch into `DIR/<point>/failed.json` (process 0)."""
        import jax

        if jax.process_index() == 0:
            with contextlib.suppress(OSError):  # a full disk, say: the console still has the line
                record_failure(self.dir, message)


def command(config_arg: str, workdir: Path, point: dict, extra: list[str]) -> list[str]:
    """The launch.py command line that trains `point` into `workdir/<name>`."""
    overrides = [f"--config.{k}={v}" for k, v in point.items() if k != "name"]
    return [sys.executable, str(LAUNCH), f"--config={config_arg}",
            f"--workdir={workdir / point['name']}", *extra, *overrides]


def commands(config_arg: str, workdir: Path, extra: list[str]) -> list[str]:
    """One shell command per point (for --dry_run)."""
    return [shlex.join(command(config_arg, workdir, p, extra)) for p in points(config_arg)]


def point_command(config_arg: str, workdir: Path, point: dict, extra: list[str]) -> list[str]:
    """The launch.py command line that trains `point` as `--sweep --point` (a failure recorded)."""
    return [sys.executable, str(LAUNCH), f"--config={config_arg}", "--sweep",
            f"--point={point['name']}", f"--workdir={workdir}", *extra]


def launch(config_arg: str, workdir: Path, extra: list[str], dry_run: bool, collect_only: bool) -> None:
    """`launch.py --sweep` without --point: prints the number of points (to size an array job) and
    their commands (`dry_run`), tabulates them (`collect_only`) or trains them in turn (`run`)."""
    if dry_run:
        lines = commands(config_arg, workdir, extra)
        print(f"# {len(lines)} points: --point=0..{len(lines) - 1}", *lines, sep="\n")
    elif collect_only:
        collect(config_arg, workdir)
    else:
        run(config_arg, workdir, extra)


def run(config_arg: str, workdir: Path, extra: list[str]) -> None:
    """Trains every unfinished point in turn, then writes the report. A SIGTERM or SIGINT is passed
    to the point training (which saves a checkpoint and stops) and stops the sweep after it, with
    one line and status 128 + the signal (`PassedOn`)."""
    with PassedOn() as signals:
        for point in points(config_arg):
            point_dir = workdir / point["name"]
            if (point_dir / "summary.json").exists():
                print(f"sweep: {point['name']} is finished, skipping", flush=True)
                continue
            signals.stop_before(point["name"])
            # The point says whether it starts or resumes, and records its error if it fails.
            returncode = signals.run(point_command(config_arg, workdir, point, extra))
            signals.stop_after(point["name"], returncode)
            if returncode != 0:
                raise UserError(f"sweep point {point['name']} failed (exit {returncode}); "
                                "fix it and relaunch the sweep: finished points are skipped")
    write_report(config_arg, workdir)


class PassedOn:
    """While a sequential sweep runs its points, a SIGTERM or SIGINT to it is passed on to the point
    training (its own launch, which saves a checkpoint and stops: no point is left training
    without its sweep), and the sweep stops after that point with one line saying which point was
    stopped and how to resume, exit status 128 + the signal."""

    def __init__(self):
        self.received: int | None = None
        self._process: subprocess.Popen | None = None
        self._previous = {}

    def __enter__(self) -> "PassedOn":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        self.received = self.received or signum
        if self._process is not None:
            self._process.send_signal(signum)  # nothing once it has ended

    def run(self, command: list[str]) -> int:
        """Runs `command` to its end (a signal to the sweep meanwhile is passed on); its status."""
        self._process = subprocess.Popen(command)
        try:
            if self.received:  # arrived while it was being started
                self._process.send_signal(self.received)
            while True:  # waits in steps: the handler runs between them, whichever thread the
                try:  # signal reached (a wait without timeout would hold it until the point ends)
                    return self._process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._process = None

    def stop_before(self, name: str) -> None:
        """Stops the sweep if a signal came before point `name` started."""
        if self.received:
            self._exit(f"before point {name} started")

    def stop_after(self, name: str, returncode: int) -> None:
        """Stops the sweep if a signal came while point `name` ran (it ended with `returncode`)."""
        if self.received:
            self._exit(f"and passed it to point {name}, which stopped (exit {returncode})")

    def _exit(self, what: str) -> NoReturn:
        name = signal.Signals(self.received).name
        print(f"sweep: received {name} {what}: relaunch the same command to resume the sweep from "
              "that point (finished points are skipped)", file=sys.stderr, flush=True)
        sys.exit(128 + self.received)


def state(point_dir: Path) -> tuple[str, str]:
    """(state, detail) of the point trained in `point_dir`: finished (a `summary.json`), running (a
    live workdir lock), failed (a `failed.json`: its error line), interrupted (a checkpoint or the
    record of a launch, no live lock) or not started."""
    if (point_dir / "summary.json").exists():
        return "finished", ""
    if (holder := workdir_lock.live_holder(point_dir)) is not None:
        return "running", f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if (point_dir / FAILED).exists():
        try:
            return "failed", json.loads((point_dir / FAILED).read_text())["error"]
        except (OSError, ValueError, KeyError):
            return "failed", f"(unreadable {point_dir / FAILED})"
    if steps := run_guard.saved_steps(point_dir):
        return "interrupted", f"resumes from the checkpoint at step {steps[-1]}"
    if (point_dir / "run.json").exists() or (point_dir / "metrics.jsonl").exists():
        return "interrupted", "no checkpoint yet"
    return "not started", ""


def collect(config_arg: str, workdir: Path) -> None:
    """Trains nothing: writes the report of the finished points and lists where the others are."""
    if not workdir.is_dir():
        raise UserError(f"--workdir={workdir} holds no sweep (no such directory): give the --workdir "
                        "the points ran in")
    write_report(config_arg, workdir)
    by_state: dict[str, list[str]] = {}
    for index, point in enumerate(points(config_arg)):
        name, (where, detail) = point["name"], state(workdir / point["name"])
        by_state.setdefault(where, []).append(
            f"  {index} {name}" + (f": {detail}" if detail else ""))
    for where in ("running", "failed", "interrupted", "not started"):
        if where in by_state:
            print(f"sweep: {len(by_state[where])} {where}:", *by_state[where], sep="\n", flush=True)


def _group(point: dict) -> str:
    rest = {k: v for k, v in point.items() if k not in ("name", "seed")}
    return ", ".join(f"{k}={v}" for k, v in rest.items()) or "all"


def _fmt(values: list[float], percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def write_report(config_arg: str, workdir: Path) -> None:
    """`sweep.csv` (one row per finished point) and `sweep.md` (rows, then groups over seeds)."""
    rows = []
    for point in points(config_arg):
        summary_path = workdir / point["name"] / "summary.json"
        if summary_path.exists():
            fix = (f"it holds the point's final results: move it away and relaunch "
                   f"--point={point['name']} to write them again")
            summary = atomic.read_json_object(summary_path, fix)
            for column in COLUMNS:
                value = summary.get(column)
                if value is not None and (isinstance(value, bool) or
                                          not isinstance(value, int | float)):
                    raise RunFault(f"{summary_path} is damaged ({column} is {value!r}, not a "
                                   f"number): {fix}")
            rows.append({"name": point["name"], "group": _group(point),
                         **{c: summary.get(c) for c in COLUMNS}})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["name", "group", *COLUMNS])
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(workdir / "sweep.csv", table.getvalue())

    header = "| point | " + " | ".join(COLUMNS) + " |"
    lines = [f"# Sweep of {config_arg}", "", header, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [_fmt([row[c]], c.endswith(("top1", "top5"))) if row[c] is not None else "-"
                 for c in COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over seeds (accuracies in %):", "",
              "| group | points | " + " | ".join(COLUMNS) + " |",
              "|" + "---|" * (len(COLUMNS) + 2)]
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        cells = [_fmt([r[c] for r in members], c.endswith(("top1", "top5")))
                 if all(r[c] is not None for r in members) else "-" for c in COLUMNS]
        lines.append(f"| {group} | {len(members)} | " + " | ".join(cells) + " |")
    atomic.write_text(workdir / "sweep.md", "\n".join(lines) + "\n")
    print(f"sweep: {len(rows)} finished point(s) tabulated in {workdir / 'sweep.md'}", flush=True)
