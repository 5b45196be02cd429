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
    clock = iter([100.0, 101.0, 101.0, 102.0, 112.0, 113.0, 113.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    pace = progress.Pace(total_steps=40, step=0, batch_size=8, enabled=False)
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
