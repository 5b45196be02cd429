"""A run's pace: training images/s per log interval, the time left, and the progress line.

`Pace` is what the training loop calls (`stepped` after each call, `logged` at each log interval,
`paused` around evaluation); `Throughput` and `Progress` are its two halves. A resumed run carries
on the pace of its earlier launches (`Pace.record`, saved with each checkpoint): its training time
and the images/s of every log interval measured, so its summary is an uninterrupted run's.
"""

import contextlib
import sys
import time

import jax
import numpy as np
import tqdm

from attn_jax.metrics_log import format_duration


class Throughput:
    """Training images/s per log interval, excluding compilation (the first call of each step
    count is not timed) and evaluation (`paused`)."""

    def __init__(self, batch_size: int, rates=()):
        """`rates`: the images/s of earlier launches' log intervals."""
        self.batch_size, self.rates = batch_size, list(rates)
        self.start, self.steps, self.seen = None, 0, set()

    def stepped(self, num_steps: int, result) -> None:
        if num_steps not in self.seen:  # this call compiled: time from its end on
            self.seen.add(num_steps)
            jax.block_until_ready(result)
            self.start, self.steps = time.perf_counter(), 0
        else:
            self.steps += num_steps

    def restart(self) -> None:
        """The end of a log interval (after its host sync): records its rate, starts the next."""
        if self.steps and self.start is not None:
            self.rates.append(self.steps * self.batch_size / (time.perf_counter() - self.start))
        self.start, self.steps = time.perf_counter(), 0

    @contextlib.contextmanager
    def paused(self):
        begin = time.perf_counter()
        yield
        if self.start is not None:
            self.start += time.perf_counter() - begin

    def median(self) -> float:
        return float(np.median(self.rates)) if self.rates else 0.0

    def last(self) -> float:
        """The last log interval's images/s (0 before the first)."""
        return self.rates[-1] if self.rates else 0.0

    def seconds_for(self, steps: int) -> float:
        return steps * self.batch_size / self.median() if self.rates else 0.0


class Progress:
    """Where the run is within its steps: on a terminal a tqdm line refreshed in place (step,
    steps/s, and at each log interval its loss, images/s and ETA: no extra host sync); otherwise one
    plain line per log interval. Process 0 only."""

    def __init__(self, total_steps: int, step: int, enabled: bool):
        self.total, self.enabled, self.tty = total_steps, enabled, sys.stdout.isatty()
        self.bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                             leave=False, file=sys.stdout, disable=not (enabled and self.tty))

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def logged(self, step: int, loss: float, images_per_s: float, eta_s: float) -> None:
        line = (f"loss {loss:.4f} | {images_per_s:.0f} img/s | ETA {format_duration(eta_s)}"
                if images_per_s else f"loss {loss:.4f}")
        if self.tty:
            self.bar.set_postfix_str(line, refresh=False)
        elif self.enabled:
            print(f"step {step}/{self.total}: train {line}", flush=True)

    def close(self) -> None:
        self.bar.close()


class Pace:
    """Throughput and ETA bookkeeping of a run from `step` to `total_steps`, its training time, and
    its progress line."""

    def __init__(self, total_steps: int, step: int, batch_size: int, enabled: bool,
                 carried: dict | None = None):
        """`carried`: the `record` of the launches before this one (a resumed run), or None."""
        carried = carried or {}
        self.total = total_steps
        self.speed = Throughput(batch_size, carried.get("images_per_s", ()))
        self.progress = Progress(total_steps, step, enabled)
        self.earlier_s, self.start = float(carried.get("wall_time_s", 0.0)), time.perf_counter()

    def stepped(self, num_steps: int, result) -> None:
        """After a call of `num_steps` train steps (`result`: its outputs, to time a compile)."""
        self.speed.stepped(num_steps, result)
        self.progress.advance(num_steps)

    def logged(self, step: int, loss: float) -> None:
        """At the end of a log interval: records its images/s, shows the loss and the ETA."""
        self.speed.restart()
        self.progress.logged(step, loss, self.speed.last(), self.eta(step))

    def paused(self):
        """A context in which time does not count (evaluation)."""
        return self.speed.paused()

    def eta(self, step: int) -> float:
        """Seconds to the last step at the median images/s so far (0 before the first interval)."""
        return self.speed.seconds_for(self.total - step)

    def median(self) -> float:
        """The median images/s over every log interval measured, in this launch and earlier ones."""
        return self.speed.median()

    def wall_time(self) -> float:
        """Seconds of training: this launch's so far, and those of the launches before it."""
        return self.earlier_s + time.perf_counter() - self.start

    def record(self) -> dict:
        """What a checkpoint keeps of the pace, for a resumed run to carry on (`carried`): the
        training time so far and the images/s of each log interval (to 0.01)."""
        return {"wall_time_s": self.wall_time(),
                "images_per_s": [round(rate, 2) for rate in self.speed.rates]}

    def close(self) -> None:
        self.progress.close()
