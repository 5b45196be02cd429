"""Hyperparameter sweeps: every point of an experiment's `get_sweep()` in its own workdir.

An experiment file may define `get_sweep(arg=None)` returning a list of points, each a dict with a
`name` and the config overrides of that point, e.g.
`{"name": "self-seed1", "model.attention": "self", "seed": 1}`. Overrides of `seed` make repeats:
points that differ only in their seed form one group in the report (mean ± std over seeds).

`run` launches `launch.py` once per point in `DIR/<name>/`, skipping finished points (those with a
`summary.json`) and resuming interrupted ones (from their checkpoints); `commands` gives the same
command lines for a cluster scheduler. `write_report` tabulates the finished points in
`DIR/sweep.md` and `DIR/sweep.csv`.
"""

import csv
import io
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from attn_jax import atomic
from attn_jax.errors import UserError
from attn_jax.experiment import load_module

LAUNCH = Path(__file__).resolve().parents[1] / "launch.py"
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


def command(config_arg: str, workdir: Path, point: dict, extra: list[str]) -> list[str]:
    """The launch.py command line that trains `point` into `workdir/<name>`."""
    overrides = [f"--config.{k}={v}" for k, v in point.items() if k != "name"]
    return [sys.executable, str(LAUNCH), f"--config={config_arg}",
            f"--workdir={workdir / point['name']}", *extra, *overrides]


def commands(config_arg: str, workdir: Path, extra: list[str]) -> list[str]:
    """One shell command per point (for --dry_run)."""
    return [shlex.join(command(config_arg, workdir, p, extra)) for p in points(config_arg)]


def run(config_arg: str, workdir: Path, extra: list[str]) -> None:
    """Trains every unfinished point in turn, then writes the report."""
    for point in points(config_arg):
        point_dir = workdir / point["name"]
        if (point_dir / "summary.json").exists():
            print(f"sweep: {point['name']} is finished, skipping", flush=True)
            continue
        state = "resuming" if (point_dir / "checkpoints").exists() else "starting"
        print(f"sweep: {state} {point['name']}", flush=True)
        result = subprocess.run(command(config_arg, workdir, point, extra), check=False)
        if result.returncode != 0:
            raise UserError(f"sweep point {point['name']} failed (exit {result.returncode}); "
                            "fix it and relaunch the sweep: finished points are skipped")
    write_report(config_arg, workdir)


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
            summary = json.loads(summary_path.read_text())
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
