"""`--mode=benchmark` on a tiny model: every figure is there and consistent, one compilation per step,
and the bfloat16 path."""

import json

import jax
import jax.numpy as jnp
import pytest

from attn_jax import benchmark, summary, train

QUICK = {"warmup": 1, "repeats": 2, "steps": 1, "matmul_sizes": (128,), "matmul_repeats": 2,
         "pipeline_batches": 2, "compare_steps": 2, "rounds": 1, "profile_steps": 1}


def _quick(config):
    for key, value in QUICK.items():
        config.benchmark[key] = value
    return config


def test_benchmark_reports_speed_flops_mfu_and_the_input_pipeline(tmp_path, tiny_config,
                                                                   digits_data_dir):
    # A prepared dataset (the benchmark never downloads, so tfds' mock data would skip the input
    # pipeline): 160 of the shipped digits.
    config = _quick(tiny_config(**{"dataset.name": "sklearn_digits", "dataset.train_split": "train[:160]",
                                   "dataset.data_dir": str(digits_data_dir)}))
    report = benchmark.benchmark(config, str(tmp_path), printer=None)
    assert json.loads((tmp_path / "benchmark.json").read_text()) == json.loads(json.dumps(report))
    # The steps are compiled once each, as in a training run.
    assert report["compilations"] == {"jit(train_step)": 1, "jit(eval_step)": 1}
    forward = benchmark.model_flops(train.create_model(config, 10), (16, 16, 3))
    for name, passes in (("train", 3), ("eval", 1)):
        r = report[name]
        assert r["model_flops_per_image"] == pytest.approx(passes * forward)
        # XLA's count covers every op of the step, so at least the convs and matmuls of the passes
        # (up to the weight gradients, which XLA may count differently), and not wildly more.
        assert 0.6 * r["model_flops_per_image"] < r["flops_per_image"] < 10 * r["model_flops_per_image"]
        assert r["images_per_s"] == pytest.approx(config.batch_size / (r["step_ms"] / 1e3))
        # Each timing is paired with a peak measured beside it; MFU is the median of the ratios.
        assert len(r["step_ms_all"]) == len(r["peak_flops_per_s_all"]) == QUICK["repeats"]
        ratios = [r["flops_per_image"] * config.batch_size / (ms / 1e3) / peak
                  for ms, peak in zip(r["step_ms_all"], r["peak_flops_per_s_all"], strict=True)]
        assert min(ratios) * 0.99 <= r["mfu"] <= max(ratios) * 1.01 and r["mfu"] > 0
    peaks = report["train"]["peak_flops_per_s_all"] + report["eval"]["peak_flops_per_s_all"]
    assert min(peaks) <= report["peak"]["flops_per_s"] <= max(peaks)
    # The profile attributes the step's time to the model's layers, forward and backward.
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("op time per train step:")
    assert "forward conv_general_dilated" in profile and "backward " in profile
    assert "PatchConvNetTutorial)/ConvStem_0/" in profile
    pipeline = report["input_pipeline"]
    assert pipeline["batches"] == QUICK["pipeline_batches"] and pipeline["images_per_s"] > 0
    feeds = report["feeds"]
    assert feeds["steps_per_call"] == 1 and feeds["resident_load_s"] > 0
    for name in ("resident", "streamed"):
        assert feeds[f"{name}_ratio"] == pytest.approx(
            feeds[f"{name}_images_per_s"] / feeds["synthetic_images_per_s"])


def test_model_flops_are_the_summary_multiply_adds_doubled(tiny_config):
    model = train.create_model(tiny_config(), 10)
    shape = (16, 16, 3)
    macs = summary.forward_macs(model, summary.abstract_variables(model, shape), shape)
    # dim 16, 16x16 input: stem 3x3 s2 3->8 on 8x8 and 8->16 on 4x4, then the trunk and pooling.
    assert macs > 8 * 8 * 27 * 8 + 4 * 4 * 72 * 16
    assert benchmark.model_flops(model, shape) == 2 * macs


def test_table_peak_knows_accelerators_by_device_kind():
    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert benchmark.table_peak(Device(), "bfloat16") == 989e12
    Device.device_kind = "TPU v5 lite"
    assert benchmark.table_peak(Device(), "float32") == 197e12
    Device.device_kind = "cpu"
    assert benchmark.table_peak(Device(), "float32") is None


def test_bfloat16_computes_in_bfloat16_with_float32_parameters_and_loss(tiny_config):
    config = tiny_config(dtype="bfloat16")
    model = train.create_model(config, 10)
    mesh = train.create_mesh()
    tx = train.create_optimizer(config.optimizer, train.create_learning_rate_fn(config.optimizer, 10))
    state = train.create_train_state(model, tx, jax.random.key(0), (16, 16, 3), mesh)
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    logits, attention = jax.eval_shape(
        lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 3)), train=False), state.params)
    assert logits.dtype == attention.dtype == jnp.float32  # float32 softmax and logits
    train_fn, _ = train.jit_steps(config, mesh)
    batch = benchmark.synthetic_batch(16, (32, 32, 3), 10, mesh)
    lowered = train_fn.lower(state, batch, jax.random.key(1), None)
    assert "xbf16>" in lowered.as_text()  # the convolutions and matmuls run in bfloat16
    new_state, sums = lowered.compile()(state, batch, jax.random.key(1), None)
    assert sums["loss"].dtype == jnp.float32 and bool(jnp.isfinite(sums["loss"]))
    assert {p.dtype for p in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert train.compute_dtype("auto") == jnp.float32  # on CPU


def test_count_compilations_counts_each_new_program_once():
    f = jax.jit(lambda x: x * 2 + 1)
    with benchmark.count_compilations() as counts:
        f(jnp.ones(3))
        f(jnp.ones(3))  # cached: not counted
        f(jnp.ones(4))  # a new shape: compiled again
    assert counts["jit(<lambda>)"] == 2
