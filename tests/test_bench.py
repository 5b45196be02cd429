"""attn_jax/bench (`--mode=benchmark`) on a tiny model: every figure is there and consistent, one
compilation per step, FLOPs counted from the reference form."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import load_experiment

from attn_jax import bench, model_stats, registry, train
from attn_jax.bench import flops, host, peaks, profile, steps
from attn_jax.bench.compilations import count_compilations
from attn_jax.fast import chunking

QUICK = {"warmup": 1, "warmup_max": 3, "repeats": 2, "steps": 1, "matmul_sizes": (128,), "matmul_repeats": 2,
         "pipeline_batches": 2, "compare_steps": 2, "rounds": 1, "profile_steps": 1}


def _quick(config):
    for key, value in QUICK.items():
        config.benchmark[key] = value
    return config


@pytest.mark.slow
def test_benchmark_reports_speed_flops_mfu_and_the_input_pipeline(tmp_path, tiny_config,
                                                                   digits_data_dir):
    # A prepared dataset (the benchmark never downloads, so tfds' mock data would skip the input
    # pipeline): 160 of the shipped digits.
    config = _quick(tiny_config(**{"dataset.name": "sklearn_digits", "dataset.train_split": "train[:160]",
                                   "dataset.data_dir": str(digits_data_dir)}))
    report = bench.run(config, str(tmp_path), printer=None)
    assert json.loads((tmp_path / "benchmark.json").read_text()) == json.loads(json.dumps(report))
    # The steps are compiled once each, as in a training run.
    assert report["compilations"] == {"jit(train_step)": 1, "jit(eval_step)": 1}
    forward = flops.model_flops(registry.create_model(config, 10, impl="reference"), (16, 16, 3))
    for name, passes in (("train", 3), ("eval", 1)):
        r = report[name]
        assert r["model_flops_per_image"] == pytest.approx(passes * forward)
        # XLA's count covers every op of the step, so at least the convs and matmuls of the passes
        # (up to the weight gradients, which XLA may count differently), and not wildly more.
        assert 0.6 * r["model_flops_per_image"] < r["flops_per_image"] < 10 * r["model_flops_per_image"]
        assert r["images_per_s"] == pytest.approx(config.batch_size / (r["step_ms"] / 1e3))
        # Each timing is paired with a peak measured beside it; MFU is the median of the ratios.
        assert len(r["step_ms_all"]) == len(r["peak_flops_per_s_all"]) == QUICK["repeats"]
        # in process, nothing set the allocator (launch.py does): the minimum warm-up
        assert r["warmup_blocks"] == QUICK["warmup"]
        assert len(r["page_faults_all"]) == QUICK["repeats"] and min(r["page_faults_all"]) >= 0
        ratios = [r["flops_per_image"] * config.batch_size / (ms / 1e3) / peak
                  for ms, peak in zip(r["step_ms_all"], r["peak_flops_per_s_all"], strict=True)]
        assert min(ratios) * 0.99 <= r["mfu"] <= max(ratios) * 1.01 and r["mfu"] > 0
    measured = report["train"]["peak_flops_per_s_all"] + report["eval"]["peak_flops_per_s_all"]
    assert min(measured) <= report["peak"]["flops_per_s"] <= max(measured)
    assert report["peak"]["range"] == [min(measured), max(measured)]
    # The profile attributes the step's time to the model's layers, forward and backward.
    table = (tmp_path / "profile.txt").read_text()
    assert table.startswith("op time per train step:")
    assert "forward conv_general_dilated" in table and "backward " in table
    assert "PatchConvNetTutorial)/ConvStem_0/" in table
    pipeline = report["input_pipeline"]
    assert pipeline["batches"] == QUICK["pipeline_batches"] and pipeline["images_per_s"] > 0
    feeds = report["feeds"]
    assert feeds["steps_per_call"] == 1 and feeds["resident_load_s"] > 0
    for name in ("resident", "streamed"):
        assert feeds[f"{name}_ratio"] == pytest.approx(
            feeds[f"{name}_images_per_s"] / feeds["synthetic_images_per_s"])


@pytest.mark.parametrize("warmup, warmup_max, growing_blocks, expected_blocks", [
    (2, 12, 4, 6),  # past the minimum while the heap grows, then two settled blocks
    (2, 12, 0, 2),  # settled from the start: the minimum
    (1, 12, 0, 2),  # one settled block is not yet two in a row
    (2, 3, 10, 3),  # still growing at the cap
    (4, 2, 10, 4),  # a cap below the minimum: the minimum
    (0, 12, 10, 0),  # no warm-up asked for
])
def test_warm_up_continues_until_two_blocks_fault_no_memory_in(monkeypatch, warmup, warmup_max,
                                                              growing_blocks, expected_blocks):
    """The benchmark's timings start once the host's heap has stopped growing: each warm-up block
    of the first `growing_blocks` faults in 10,000 pages per call (a growing heap), later ones 0;
    the probe after each block faults nothing and is not counted in the timings' faults."""
    calls, faults = [], [0]
    monkeypatch.setattr(steps, "host_page_faults", lambda: faults[0])

    def call():
        calls.append(1)
        if len(calls) <= 3 * growing_blocks:
            faults[0] += 10_000
        return jnp.zeros(())

    seconds, measured, warm = steps.time_step(call, warmup, repeats=2, steps=3,
                                              probe=lambda: 1.0, warmup_max=warmup_max)
    assert warm["warmup_blocks"] == expected_blocks
    assert len(calls) == 3 * (expected_blocks + 2) and len(seconds) == 2 and measured == [1.0, 1.0]
    still_growing = [10_000.0 if expected_blocks + t < growing_blocks else 0.0 for t in range(2)]
    assert warm["page_faults_all"] == still_growing


def test_model_flops_are_the_summary_multiply_adds_doubled(tiny_config):
    model = registry.create_model(tiny_config(), 10)
    shape = (16, 16, 3)
    macs = model_stats.forward_macs(model, model_stats.abstract_variables(model, shape), shape)
    # dim 16, 16x16 input: stem 3x3 s2 3->8 on 8x8 and 8->16 on 4x4, then the trunk and pooling.
    assert macs > 8 * 8 * 27 * 8 + 4 * 4 * 72 * 16
    assert flops.model_flops(model, shape) == 2 * macs


def test_table_peak_knows_accelerators_by_device_kind():
    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert peaks.table_peak(Device(), "bfloat16") == 989e12
    Device.device_kind = "NVIDIA H100 NVL"  # the more specific entry wins over "NVIDIA H100"
    assert peaks.table_peak(Device(), "bfloat16") == 835e12
    Device.device_kind = "NVIDIA H200 NVL"
    assert peaks.table_peak(Device(), "bfloat16") == 835e12
    Device.device_kind = "NVIDIA H200"
    assert peaks.table_peak(Device(), "float32") == 495e12
    Device.device_kind = "TPU v5 lite"
    assert peaks.table_peak(Device(), "float32") == 197e12
    Device.device_kind = "cpu"
    assert peaks.table_peak(Device(), "float32") is None


def test_count_compilations_counts_each_new_program_once():
    f = jax.jit(lambda x: x * 2 + 1)
    with count_compilations() as counts:
        f(jnp.ones(3))
        f(jnp.ones(3))  # cached: not counted
        f(jnp.ones(4))  # a new shape: compiled again
    assert counts["jit(<lambda>)"] == 2


def _tiny_eanet(attention: str, impl: str):
    """The EANet experiment shrunk to 16x16 inputs, 16 tokens and one block, from the `impl` layers."""
    config = load_experiment("eanet")
    config.batch_size = 32
    config.preprocess.size = config.preprocess.train_resize = 16
    config.model.update(dict(patch_size=4, dim=16, mlp_dim=16, num_heads=2, dim_coefficient=2,
                             num_blocks=1, memory_slots=8, attention=attention, impl=impl))
    return config


@pytest.mark.parametrize("attention", ["external", "self"])
def test_a_fast_step_counts_the_flops_of_its_reference_form(monkeypatch, attention):
    """The fast layers compute attention in a loop over chunks of examples, whose body XLA's cost
    analysis counts once; the benchmark counts every step from the reference form, so the fast and
    the reference train steps count the same FLOPs: the reference step's."""
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1)  # chunk even this tiny attention: 4 chunks of 1
    mesh = train.create_mesh()
    own, counted = {}, {}
    for impl in ("reference", "fast"):
        config = _tiny_eanet(attention, impl)
        _, state, train_key = steps.initial_state(config, mesh, abstract=True)  # shapes suffice
        train_fn = train.jit_train_step(config, mesh)
        batch = steps.synthetic_batch(config.batch_size, (16, 16, 3), 100, mesh)
        stats = steps.placeholder_stats(config)
        compiled = train_fn.lower(state, batch, train_key, stats).compile()
        own[impl] = model_stats.cost_flops(compiled) * mesh.devices.size
        counted[impl] = flops.xla_flops(train_fn, compiled, state, batch, train_key, stats,
                                        config=config, num_devices=mesh.devices.size)
    assert counted["fast"] == counted["reference"] == own["reference"]
    assert own["fast"] < own["reference"]  # what the fast step itself counts: one chunk's attention


def test_host_description_names_the_cpu_and_its_cores():
    info = host.host_description()
    assert info["cpu"] and info["cores"] == os.cpu_count()
    assert set(info.get("simd", [])) <= set(host.SIMD_FLAGS)
    assert host.load_average() is None or host.load_average() >= 0


def test_profile_table_groups_the_ops_by_pass_and_kind():
    names = {"fusion.1": "jit(train_step)/Model/Conv_0/conv_general_dilated",
             "fusion.2": "jit(train_step)/transpose(jvp(Model))/Conv_0/conv_general_dilated",
             "dot.3": "jit(train_step)/Model/Dense_0/dot_general"}
    events = [{"ph": "X", "name": "fusion.1", "dur": 6000}, {"ph": "X", "name": "fusion.2", "dur": 12000},
              {"ph": "X", "name": "dot.3", "dur": 2000}, {"ph": "X", "name": "unnamed", "dur": 1e9},
              {"ph": "i", "name": "dot.3", "dur": 1e9}]
    lines = profile.op_table(events, names, 2, Path("DIR")).splitlines()
    assert lines[0] == "op time per train step: 10 ms (trace in DIR)"  # 20 ms over 2 steps
    assert lines[1].split() == ["6.0", "ms", "60.0%", "backward", "conv_general_dilated"]
    assert lines[2].split() == ["3.0", "ms", "30.0%", "forward", "conv_general_dilated"]
    assert lines[3].split() == ["1.0", "ms", "10.0%", "forward", "dot_general"]
    assert lines[4] == "slowest ops:"
    assert lines[5].endswith("ms  transpose(jvp(Model))/Conv_0/conv_general_dilated")
    assert "do not name XLA ops" in profile.op_table(events, {}, 2, Path("DIR"))
