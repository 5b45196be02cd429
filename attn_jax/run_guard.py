"""What keeps a training run safe to stop and to relaunch: `StopSignals` (SIGTERM/SIGINT become a
request to stop after the current step), `DispatchQueue` (so such a request is honoured promptly),
`finished_run` (relaunching a finished run changes nothing), `refuse_to_start_over` (a run's
outputs are never trained over from scratch) and `relaunch_advice` (what a run stopped by a fault
of the machine keeps, from its `saved_steps` and `run_outputs`).
"""

import signal
import threading
from pathlib import Path

import jax

from attn_jax import atomic
from attn_jax.errors import RELAUNCH, UserError


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop after the current step (`.received`)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class DispatchQueue:
    """Keeps at most two train calls queued on the devices. JAX dispatches asynchronously, so the
    loop would otherwise queue every call up to the next log line (which waits for its metrics):
    minutes of work that a SIGTERM would wait for before its checkpoint, beyond a scheduler's usual
    grace period. One call queued behind the running one keeps the devices as busy."""

    def __init__(self):
        self._previous = None

    def dispatched(self, step: jax.Array) -> None:
        """After dispatching a call whose new step counter is `step`: waits for the call before it."""
        if self._previous is not None:
            self._previous.block_until_ready()
        self._previous = step + 0  # a copy: the next call donates the state that holds `step`


def finished_run(workdir: Path) -> dict | None:
    """A finished run's summary (its `summary.json`), after saying so; None for an unfinished one.
    Relaunching a finished run changes nothing in its workdir."""
    path = workdir / "summary.json"
    if not path.exists():
        return None
    summary = atomic.read_json_object(path, "it holds the final results: move it away and relaunch "
                                            "the same command to write them again")
    if jax.process_index() == 0:
        print(f"the run in {workdir} is finished ({path}): nothing to do. Evaluate it with "
              "--mode=eval, or train another run (a longer one, another config) in another "
              "--workdir", flush=True)
    return summary


def run_outputs(workdir: Path) -> list[str]:
    """The logs of a run in `workdir` that a fresh start would write over (those not empty)."""
    return [name for name in ("metrics.jsonl", "attention", "curves.png")
            if (workdir / name).exists() and (workdir / name).stat().st_size]


def saved_steps(workdir: Path) -> list[int]:
    """The steps of the checkpoints committed in `workdir/checkpoints`, ascending (orbax writes a
    checkpoint in a temporary folder and renames it to its step when complete)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def refuse_to_start_over(workdir: Path) -> None:
    """A workdir holding a run's logs but no checkpoint to resume from is not started afresh over
    them: a `UserError` naming the logs."""
    if logs := run_outputs(workdir):
        raise UserError(f"{workdir} holds a run's outputs ({', '.join(logs)}) but no checkpoint to "
                        "resume from: use another --workdir, or move those files away to start "
                        "afresh")


def relaunch_advice(workdir: Path) -> str:
    """What a training run in `workdir` stopped by a fault of the machine keeps, and how to go on:
    for `errors.describe_environment_error`, from what the workdir holds."""
    try:
        steps, logs = saved_steps(workdir), run_outputs(workdir)
    except OSError:  # the fault may be the workdir itself
        return (f"{RELAUNCH}: it resumes from the newest checkpoint in {workdir / 'checkpoints'}, "
                "if one was saved")
    if steps:
        return (f"the checkpoint at step {steps[-1]} is kept: fix this, then relaunch the same "
                "command to resume from it")
    if logs:
        return (f"no checkpoint was saved, so the run cannot resume: fix this, then move "
                f"{', '.join(logs)} out of {workdir} (or use another --workdir) to start afresh")
    return f"no checkpoint was saved: {RELAUNCH} to start the run afresh"
