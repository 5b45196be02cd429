"""The run's pace: images/s per log interval without compiles or evaluation, ETA, progress line."""

import time

import jax.numpy as jnp

from attn_jax import progress


def test_progress_is_a_line_per_log_interval_off_a_terminal_and_in_place_on_one(capsys,
                                                                               monkeypatch):
    line = progress.Progress(total_steps=100, step=10, enabled=True)
    line.advance(10)
    line.logged(20, 1.2345, 150.0, 3725)
    line.close()
    assert capsys.readouterr().out == "step 20/100: train loss 1.2345 | 150 img/s | ETA 1h02m05s\n"
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    line = progress.Progress(total_steps=100, step=10, enabled=True)
    line.advance(10)
    line.logged(20, 1.2345, 150.0, 3725)
    assert line.bar.n == 20 and "loss 1.2345 | 150 img/s" in line.bar.postfix
    line.close()
    assert "step 20/100" not in capsys.readouterr().out  # refreshed in place, not printed
    quiet = progress.Progress(total_steps=100, step=0, enabled=False)  # processes other than 0
    quiet.logged(5, 1.0, 0.0, 0.0)
    quiet.close()
    assert capsys.readouterr().out == ""


def test_pace_times_neither_the_compiling_call_nor_evaluation(monkeypatch):
    clock = iter([90.0, 100.0, 101.0, 101.0, 102.0, 112.0, 113.0, 113.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    pace = progress.Pace(total_steps=40, step=0, batch_size=8, enabled=False)  # created at 90
    pace.stepped(2, jnp.zeros(()))  # compiled in this call: timing starts at its end (100)
    pace.stepped(2, jnp.zeros(()))
    pace.logged(4, 1.0)  # at 101: 2 steps of 8 images in 1 s; the next interval starts at 101
    assert pace.median() == 16.0
    pace.stepped(2, jnp.zeros(()))
    with pace.paused():  # 102 .. 112: evaluation, not counted
        pass
    pace.logged(6, 1.0)  # at 113: 16 images in 113 - 101 - 10 = 2 s
    assert pace.speed.last() == 8.0 and pace.median() == 12.0
    assert pace.eta(6) == (40 - 6) * 8 / 12.0
    pace.close()


def test_a_resumed_pace_carries_on_the_time_and_rates_of_the_earlier_launches(monkeypatch):
    """A resumed run's wall time adds its launches' training times, and its images/s is the median
    over every log interval measured in any of them (`Pace.record`, saved with each checkpoint)."""
    clock = iter([10.0, 11.0, 13.0, 13.0, 13.0, 20.0, 21.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    first = progress.Pace(total_steps=40, step=0, batch_size=8, enabled=False)  # at 10
    first.stepped(2, jnp.zeros(()))  # compiled; timing from 11
    first.stepped(2, jnp.zeros(()))
    first.logged(4, 1.0)  # at 13: 16 images in 2 s
    saved = first.record()  # at 13: 3 s of training
    assert saved == {"wall_time_s": 3.0, "images_per_s": [8.0]}
    resumed = progress.Pace(total_steps=40, step=4, batch_size=8, enabled=False,
                            carried=saved)  # at 20
    resumed.speed.rates.append(24.0)  # one interval of its own
    assert resumed.median() == 16.0  # of 8 and 24
    assert resumed.wall_time() == 3.0 + 21.0 - 20.0
