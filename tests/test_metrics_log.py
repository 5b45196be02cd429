"""attn_jax/metrics_log.py: metrics.jsonl resumed after a crash, and JSON files written whole."""

import json
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attn_jax import metrics_log
from attn_jax.errors import RunFault, UserError


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_config, capsys):
    """A crash in the middle of writing metrics.jsonl leaves half a line: resuming drops it with a
    warning; an unreadable line before the end is an error naming it; JSON files are written whole."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "epoch": 1, "train/loss": 1.5}\n{"step": 4, "epo')
    log = metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)
    log.write(4, 1, {"train/loss": 1.25})
    log.close()
    assert "dropped the torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert not list(tmp_path.glob(".*.tmp*"))  # config.json written through a renamed temp file
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dim"] == 16

    path.write_text('{"step": 2, "epo\n{"step": 4, "epoch": 1}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 1 is not JSON"):
        metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)
    for damaged in (b"\x00\xff\xfe garbage\n", b"[2, 4]\n"):  # not text; JSON but no record
        path.write_bytes(damaged + b'{"step": 4, "epoch": 1}\n')
        with pytest.raises(RunFault, match=r"metrics.jsonl line 1 is not JSON of a step's metrics"):
            metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)


def test_a_resumed_log_shows_each_step_once_in_tensorboard(tmp_path, tiny_config):
    """A launch that crashed after its checkpoint at step 4 had logged step 6: the relaunch resumes
    at 4 and logs 6 again. TensorBoard shows step 6 once, the relaunch's, as metrics.jsonl does."""
    crashed = metrics_log.MetricsLog(tmp_path, tiny_config())
    for step, loss in ((2, 3.0), (4, 2.0), (6, 1.0)):
        crashed.write(step, 1, {"train/loss": loss})
    crashed.close()
    time.sleep(1.1)  # event files are named by the second they are opened in
    resumed = metrics_log.MetricsLog(tmp_path, tiny_config(), resume_step=4)
    resumed.write(6, 1, {"train/loss": 1.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 3.0), (4, 2.0), (6, 1.5)]
    assert [json.loads(line)["train/loss"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3.0, 2.0, 1.5]
