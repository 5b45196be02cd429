"""What keeps a training run safe to stop and to relaunch: `StopSignals` (SIGTERM/SIGINT become a
request to stop after the current step), `DispatchQueue` (so such a request is honoured promptly),
`finished_run` (relaunching a finished run changes nothing) and `refuse_to_start_over` (a run's
outputs are never trained over from scratch).
"""

import signal
import threading
from pathlib import Path

import jax

from attn_jax import atomic
from attn_jax.errors import UserError


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


def refuse_to_start_over(workdir: Path) -> None:
    """A workdir holding a run's logs but no checkpoint to resume from is not started afresh over
    them: a `UserError` naming the logs."""
    logs = [name for name in ("metrics.jsonl", "attention", "curves.png")
            if (workdir / name).exists() and (workdir / name).stat().st_size]
    if logs:
        raise UserError(f"{workdir} holds a run's outputs ({', '.join(logs)}) but no checkpoint to "
                        "resume from: use another --workdir, or move those files away to start "
                        "afresh")
