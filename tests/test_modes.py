"""attn_jax/modes.py, the modes other than training: summary, eval and attend on a saved checkpoint
(any checkpoint will do: one of the initial state, saved as training saves it); and the imports'
direction (the modes use the library, never the other way round; attention_maps draws arrays)."""

import ast
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, digits_config, load_experiment, png_size
from PIL import Image

from attn_jax import attention_maps, checkpoint, modes, run_record, train, validate
from attn_jax.config import base
from attn_jax.errors import UserError
from attn_jax.state import has_ema, with_ema

# A tiny PatchConvNet on the digits (16x16 inputs -> 4x4 = 16 patches).
OVERRIDES = {"dataset.train_split": "train[:64]", "dataset.val_split": "train[1150:1214]",
             "dataset.test_split": "test[:128]", "batch_size": 32, "eval_batch_size": 64,
             "preprocess.size": 16, "preprocess.train_resize": 18, "preprocess.crop": 16,
             "model.dim": 16}


def _config(data_dir):
    return digits_config(data_dir, OVERRIDES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_data_dir):
    """A workdir holding one checkpoint of the tiny PatchConvNet: its initial state, at step 0."""
    config = _config(digits_data_dir)
    workdir = tmp_path_factory.mktemp("saved")
    run = train.build_run(config, train.create_mesh(), workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
    ckpt.save(run.state, train.zero_sums(run.mesh), checkpoint.model_description(config))
    ckpt.close()
    return workdir


def test_summary_of_s60_needs_no_data(capsys):
    config = load_experiment("patch_convnet_s60_imagenet")
    assert config.model.name == "S60" and config.dataset.name == "imagenet2012"
    assert config.optimizer.learning_rate == pytest.approx(5e-4 * config.batch_size / 512)
    assert config.optimizer.warmup_fraction * config.num_epochs == pytest.approx(5)
    modes.summarize(config)  # abstract: no dataset is read
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "model: S60 (1000 classes)"
    assert lines[-1] == "total params: 25,231,096"  # published: 25.2M
    paper = next(line for line in lines if line.startswith("forward FLOPs per image (paper"))
    assert float(paper.split(": ")[-1].split()[0]) == pytest.approx(4.0, rel=0.01)  # published 4.0


def test_eval_mode_evaluates_a_checkpoint_and_writes_the_metrics(saved, digits_data_dir):
    metrics = modes.evaluate_checkpoint(_config(digits_data_dir), str(saved), "latest")
    assert metrics["step"] == 0 and metrics["checkpoint"] == "latest"
    assert metrics["test/examples"] == 128
    assert 0.0 <= metrics["test/top1"] <= metrics["test/top5"] <= 1.0
    assert json.loads((saved / "eval_latest_test.json").read_text()) == metrics


def test_params_ema_evaluates_the_average_and_needs_one(saved, digits_data_dir, tmp_path):
    """--params=ema on a checkpoint without an EMA is one line; a checkpoint with one evaluates
    under a config with or without EMA, its raw and its EMA parameters (equal at step 0), and a
    state without an EMA slot is refused that checkpoint before orbax reads it."""
    with pytest.raises(UserError, match=r"^--params=ema: the checkpoint at step 0 in .* holds no EMA "
                                        r"of the parameters .*: use --params=raw$"):
        modes.evaluate_checkpoint(_config(digits_data_dir), str(saved), "latest", params="ema")
    config = _config(digits_data_dir)
    config.ema.decay = 0.9
    run = train.build_run(config, train.create_mesh(), tmp_path)
    assert has_ema(run.state)
    ckpt = checkpoint.Checkpointer(tmp_path, config.checkpoint.keep)
    ckpt.save(run.state, train.zero_sums(run.mesh), checkpoint.model_description(config))
    ckpt.wait()
    with pytest.raises(UserError, match=r"saved with an EMA of the parameters and this config has "
                                        r"none: set config.ema.decay"):
        ckpt.restore(0, with_ema(run.state, False), train.zero_sums(run.mesh),
                     checkpoint.model_description(config))
    ckpt.close()
    raw = modes.evaluate_checkpoint(_config(digits_data_dir), str(tmp_path), "latest")
    ema = modes.evaluate_checkpoint(_config(digits_data_dir), str(tmp_path), "latest", params="ema")
    assert (raw["params"], ema["params"]) == ("raw", "ema")
    assert raw["test/top1"] == ema["test/top1"] and raw["test/loss"] == ema["test/loss"]
    assert json.loads((tmp_path / "eval_latest_ema_test.json").read_text()) == ema


def _images(directory):
    """A grayscale PNG, an RGBA PNG and an odd-sized RGB JPEG."""
    rng = np.random.default_rng(0)
    paths = [directory / "gray.png", directory / "rgba.png", directory / "photo.jpg"]
    Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8), "L").save(paths[0])
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), np.uint8), "RGBA").save(paths[1])
    Image.fromarray(rng.integers(0, 256, (101, 67, 3), np.uint8), "RGB").save(paths[2])
    return paths


def test_load_fills_the_fields_an_old_record_lacks_from_the_base(saved, digits_data_dir, tmp_path):
    """A run.json written before some fields existed (here the attention maps, the CPU settings,
    model.impl and the benchmark's knobs) loads with those at the base config's defaults."""
    workdir = tmp_path / "old"
    shutil.copytree(saved, workdir)
    config = _config(digits_data_dir)
    run_record.check_and_record(workdir, config, train.create_mesh(), resuming=False)
    record = json.loads((workdir / run_record.RECORD).read_text())
    lacking = ("attention_every_epochs", "attention_images", "cpu_devices", "host_memory",
               "model.impl", "benchmark.steps")
    record["config"] = {k: v for k, v in record["config"].items() if k not in lacking}
    (workdir / run_record.RECORD).write_text(json.dumps(record))
    loaded = modes.load(workdir, "latest")
    validate.check(loaded.config)  # every field there
    defaults = validate.leaves(base())
    assert {k: validate.leaves(loaded.config)[k] for k in lacking} == {
        k: defaults[k] for k in lacking}
    assert loaded.config.model.dim == 16 and loaded.step == 0


def test_attend_on_any_image(saved, digits_data_dir, tmp_path):
    results = modes.attend(_config(digits_data_dir), saved, _images(tmp_path), "latest")
    assert [r["output"] for r in results] == [str(saved / "attend" / f"{n}.png")
                                              for n in ("gray", "rgba", "photo")]
    for result in results:
        assert png_size(result["output"]) == tuple(round(x * attention_maps.DPI)
                                                   for x in attention_maps.ATTEND_INCHES)
        assert len(result["top5"]) == 5
        assert {name for name, _ in result["top5"]} <= {str(d) for d in range(10)}
        probs = [p for _, p in result["top5"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert modes.format_result(results[0]).splitlines()[1].startswith("  1. ")


def test_attend_names_each_output_after_its_image_uniquely(tmp_path):
    paths = [tmp_path / "a" / "cat.jpg", tmp_path / "b" / "cat.png", tmp_path / "dog.png"]
    assert modes._output_names(paths) == ["cat", "cat_2", "dog"]


def _no_attention_config(name, data_dir):
    """experiments/<name>.py:smoke if it exists, else the tutorial's smoke run with that model."""
    if (ROOT / "experiments" / f"{name}.py").exists():
        config = load_experiment(name, "smoke")
    else:
        config = load_experiment("patch_convnet", "smoke")
        config.model = {"name": "eanet", "patch_size": 4, "dim": 16, "mlp_dim": 32, "num_heads": 2,
                        "dim_coefficient": 2, "num_blocks": 1, "attention_dropout": 0.0,
                        "projection_dropout": 0.0, "memory_slots": 8,
                        "attention": "self" if name == "vit" else "external", "impl": "auto"}
    config.dataset.data_dir = str(data_dir)
    return config


def test_bad_input_is_a_clear_error(saved, digits_data_dir, tmp_path):
    config = _config(digits_data_dir)
    good = _images(tmp_path)[0]
    (tmp_path / "x.png").write_text("not an image\n")
    with pytest.raises(UserError, match=r"--image=.*missing.png: no such file"):
        modes.attend(config, saved, [str(tmp_path / "missing.png")])
    with pytest.raises(UserError, match=r"--image=.*x.png: not an image file"):
        modes.attend(config, saved, [str(tmp_path / "x.png")])
    with pytest.raises(UserError, match="at least one --image"):
        modes.attend(config, saved, [])
    (tmp_path / "empty").mkdir()
    for empty in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(UserError, match="no checkpoint in .*train there first"):
            modes.attend(config, empty, [str(good)])
    for name in ("eanet", "vit"):
        with pytest.raises(UserError, match=r"model 'eanet' has no attention map: "
                                            r"--mode=attend needs a PatchConvNet"):
            modes.attend(_no_attention_config(name, digits_data_dir), saved, [str(good)])


@pytest.mark.slow
def test_launch_attend_with_a_missing_image_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch.py", "--config=experiments/patch_convnet.py:smoke",
         f"--workdir={tmp_path}", "--mode=attend", f"--image={tmp_path / 'nope.jpg'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --image={tmp_path / 'nope.jpg'}: no such file"]
    assert "Traceback" not in result.stderr


def test_sixteen_bit_grey_images_are_rescaled_not_clipped(tmp_path):
    """A 16-bit PNG's grey levels (0..65535) become 0..255: PIL's convert("RGB") clips them to
    white. 32-bit float levels have no fixed range and are refused."""
    levels = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    rgb = modes.read_image(tmp_path / "grey16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 1, 128, 255]])
    Image.fromarray(np.full((2, 2), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(UserError, match="grey levels beyond 16 bits have no fixed range"):
        modes.read_image(tmp_path / "float.tiff")


def attn_jax_imports(module: str) -> set[str]:
    """The attn_jax modules that attn_jax/<module>.py imports (at any depth of its code)."""
    tree = ast.parse((ROOT / "attn_jax" / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attn_jax"):
            names |= {f"{node.module}.{a.name}" if node.module == "attn_jax" else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("attn_jax")}
    return names


@pytest.mark.parametrize("module", ["train", "data", "checkpoint", "models/__init__", "inference",
                                    "attention_maps"])
def test_the_library_does_not_import_the_modes(module):
    assert not {name for name in attn_jax_imports(module)
                if name in ("attn_jax.modes", "attn_jax.bench") or name.startswith("attn_jax.bench.")}


def test_attention_maps_draws_from_arrays_alone():
    """attention_maps renders the arrays it is given: it needs no model, data, checkpoint or run."""
    assert attn_jax_imports("attention_maps") <= {"attn_jax.atomic", "attn_jax.errors"}
