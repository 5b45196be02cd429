"""The modes of `launch.py` other than training, each one function of the config.

- `summarize` (--mode=summary): the parameter table and forward FLOPs, abstractly (no data).
- `evaluate_checkpoint` (--mode=eval): a saved checkpoint's metrics on a split.
- `attend` (--mode=attend): a saved checkpoint's top-5 classes and attention map on any image file,
  drawn beside it (`attention_maps.render_side_by_side`), with `format_result` its console lines.
- `import_weights` / `export_weights` (--mode=import|export): the official PatchConvNet weights
  (PyTorch `.pth`) to a checkpoint and back (`attn_jax.interop`).
- `load` (`attn_jax.load`): a saved model, its parameters and config, for notebooks.
- `benchmark` (--mode=benchmark): how fast the steps and the input pipeline run (`attn_jax.bench`).

This module uses the training package (`train.build_run` builds a run as training does, and
`state.initial_state` the train state, abstractly where a checkpoint or imported weights replace
it); nothing there imports it.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attn_jax import (
    atomic,
    attention_maps,
    bench,
    checkpoint,
    data,
    inference,
    model_stats,
    registry,
    run_guard,
    run_record,
    train,
    warm_start,
    workdir_lock,
)
from attn_jax.errors import UserError, one_line
from attn_jax.interop import patch_convnet as official
from attn_jax.interop import pth
from attn_jax.metrics import zero_sums
from attn_jax.state import initial_state, with_ema


@one_line
def summarize(config: ml_collections.ConfigDict) -> None:
    """--mode=summary: the parameter table per module, forward FLOPs per image and the total, of
    the model's reference form (the fast layers have the same parameters, and folded memories that
    would count fewer FLOPs)."""
    num_classes = config.dataset.num_classes
    model = registry.create_model(config, num_classes, impl="reference")
    size = config.preprocess.size
    print(f"model: {config.model.name} ({num_classes} classes)")
    print(model_stats.format_summary(model, (size, size, 3)))


@one_line
def benchmark(config: ml_collections.ConfigDict, workdir: str | None = None, mesh=None) -> dict:
    """--mode=benchmark: `attn_jax.bench.run`, which prints its figures and with `workdir` writes
    them to DIR/benchmark.json."""
    return bench.run(config, workdir, mesh)


def _restored_run(config: ml_collections.ConfigDict, workdir: Path, which: str | int, mesh=None,
                  params: str = "raw") -> tuple[train.Run, int]:
    """(the run of `workdir` built as training builds it, with checkpoint `which` ('best', 'latest'
    or a step) restored into its state; that checkpoint's step). Nothing is written.

    `params`: "raw", the trained parameters, or "ema", their moving average (config.ema), which
    then stands in the state's `params`. A checkpoint restores whether or not the config keeps an
    EMA; "ema" needs a checkpoint that holds one."""
    if params not in ("raw", "ema"):
        raise UserError(f"--params={params}: use 'raw' or 'ema'")
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep, read_only=True)
    try:
        step = ckpt.resolve(which)
        saved_ema = ckpt.has_ema(step)
        if params == "ema" and not saved_ema:
            raise UserError(f"--params=ema: the checkpoint at step {step} in {ckpt.directory} "
                            "holds no EMA of the parameters (its run had config.ema.decay = 0): "
                            "use --params=raw")
        run = train.build_run(config, train.create_mesh() if mesh is None else mesh, workdir,
                              abstract=True)  # the checkpoint replaces every value
        state, _ = ckpt.restore(step, with_ema(run.state, saved_ema),
                                zero_sums(run.mesh), checkpoint.model_description(config))
        run.state = state.replace(params=state.ema_params) if params == "ema" else state
    finally:
        ckpt.close()
    return run, step


@one_line
def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str | int = "best",
                        split: str = "test", mesh=None, params: str = "raw") -> dict[str, float]:
    """--mode=eval: restores checkpoint `which` ('best', 'latest' or a step) of `workdir` and
    evaluates its `params` ("raw" or "ema") on `split`; writes `workdir/eval_<which>_<split>.json`
    (`eval_<which>_ema_<split>.json` for the EMA)."""
    workdir = Path(workdir)
    run, step = _restored_run(config, workdir, which, mesh, params)
    run.compile()
    metrics = {"step": step, "checkpoint": which, "params": params,
               **{f"{split}/{k}": v for k, v in run.evaluate(split).items()}}
    if jax.process_index() == 0:
        path = workdir / f"eval_{which}_{'ema_' if params == 'ema' else ''}{split}.json"
        atomic.write_text(path, json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------
# --mode=import and --mode=export: the official PatchConvNet weights (attn_jax.interop)
# ---------------------------------------------------------------------------------------------
@one_line
def import_weights(config: ml_collections.ConfigDict, workdir: str | Path, weights: str | Path,
                   mesh=None) -> Path:
    """--mode=import: the official PatchConvNet `state_dict` in `weights` (a `.pth` file, read
    without PyTorch) as checkpoint 0 of a new `workdir`, which --mode=eval|attend restore and
    config.init_from starts from; DIR/run.json records the config. Returns the checkpoint's path.

    The file is read and every tensor mapped (`interop.patch_convnet.to_params`) before anything
    is written; a workdir that already holds a run (its DIR/run.json, a checkpoint past step 0, or
    a run's outputs) is refused. An import stopped before it wrote DIR/run.json, its last write,
    is redone afresh over what it left, and a finished one (the same file and config) is not done
    again: its checkpoint's path is returned. The optimizer state is fresh; an EMA (config.ema) starts
    at the imported parameters."""
    if not weights:
        raise UserError("--mode=import needs --weights=FILE.pth, the official state_dict")
    workdir = Path(workdir)
    if (done := _finished_import(config, workdir, weights)) is not None:
        return done
    _check_import_target(workdir)  # before the file is read: a refusal costs nothing
    state_dict = pth.read_state_dict(weights)
    mesh = train.create_mesh() if mesh is None else mesh
    _, _, abstract = initial_state(config, mesh, total_steps=1, abstract=True)
    params = official.to_params(state_dict, abstract.params,  # all or nothing
                                source=f"--weights={weights}")
    with workdir_lock.hold(workdir):
        _check_import_target(workdir)  # again, now that no other run can write there
        if jax.process_index() == 0:  # what a stopped import left: its checkpoint, whole or not
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep)
        try:
            state = warm_start.warm_state(abstract, params)
            description = {**checkpoint.run_description(config),
                           "imported_from": str(Path(weights).absolute())}
            ckpt.save(state, zero_sums(mesh), description)
            ckpt.wait()
        finally:
            ckpt.close()
        # What `load` reads, once the checkpoint is whole: an import that failed before (a full
        # disk) leaves no record, so relaunching it imports afresh.
        run_record.check_and_record(workdir, config, mesh, resuming=False)
    return ckpt.directory / "0"


def _finished_import(config: ml_collections.ConfigDict, workdir: Path, weights) -> Path | None:
    """The checkpoint of the finished import of `weights` with `config` in `workdir`, after saying
    so (relaunching a finished import changes nothing), or None."""
    if run_guard.saved_steps(workdir) != [0] or not (workdir / run_record.RECORD).exists():
        return None
    ckpt = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
    try:
        source = ckpt.imported_from(0)
    finally:
        ckpt.close()
    recorded = run_record.read_record(workdir, "it records the imported run: put back a good copy, "
                                               "or import into a new --workdir")["config"]
    if source != str(Path(weights).absolute()) or run_record.differences(recorded, config):
        return None
    if jax.process_index() == 0:
        print(f"the import of {weights} into {workdir} is finished: nothing to do", flush=True)
    return ckpt.directory / "0"


def _check_import_target(workdir: Path) -> None:
    """Refuses a workdir holding a run: its record, a checkpoint past step 0 (an import saves only
    step 0, and records the run after it) or a run's outputs. A new workdir passes, and so does
    one holding only what a stopped import left."""
    if ((workdir / run_record.RECORD).exists() or any(run_guard.saved_steps(workdir))
            or run_guard.run_outputs(workdir) or (workdir / "summary.json").exists()):
        raise UserError(f"{workdir} already holds a run: import into a new --workdir")


@one_line
def export_weights(config: ml_collections.ConfigDict, workdir: str | Path, weights: str | Path,
                   which: str | int = "best", params: str = "raw") -> Path:
    """--mode=export: checkpoint `which` of `workdir` (its `params`, "raw" or "ema") as the
    official PatchConvNet `state_dict`, written to the new file `weights` in PyTorch's format
    (`PatchConvnet.load_state_dict(torch.load(weights))` loads it). An existing file is refused."""
    if not weights:
        raise UserError("--mode=export needs --weights=FILE.pth, the file to write")
    weights = Path(weights)
    if weights.exists():
        raise UserError(f"--weights={weights} exists: export writes a new file, choose another name")
    if not weights.parent.is_dir():
        raise UserError(f"--weights={weights}: no such directory {weights.parent}")
    loaded = load(workdir, which, params, config=config)
    state_dict = official.to_state_dict(loaded.params)
    if jax.process_index() == 0:
        _write_new_file(weights, lambda path: pth.write_state_dict(path, state_dict))
    return weights


def _write_new_file(path: Path, write) -> None:
    """`write(temporary)` then the temporary published as `path` whole, never over a file that
    appeared meanwhile (`atomic.create`)."""
    try:
        atomic.create(path, write)
    except FileExistsError:
        raise UserError(f"--weights={path} exists: export writes a new file, choose another "
                        "name") from None


@dataclasses.dataclass
class Loaded:
    """A saved model, ready for `model.apply({"params": params}, images, train=False)`:
    float32 images [B, size, size, 3] preprocessed as `config.preprocess` says
    (`attn_jax.preprocess.for_eval`) -> (logits [B, classes], attention map [B, N] or None)."""

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    step: int


@one_line
def load(path: str | Path, which: str | int = "best", params: str = "raw",
         config: ml_collections.ConfigDict | None = None) -> Loaded:
    """`attn_jax.load`: the model, parameters and config saved in `path`, a workdir (its checkpoint
    `which`: "best", "latest" or a step) or one checkpoint, DIR/checkpoints/STEP; trained and
    imported runs alike. The config is the run's own (DIR/run.json) unless one is given. `params`:
    "raw" or "ema" (the moving average, where the run kept one)."""
    if params not in ("raw", "ema"):
        raise UserError(f"params={params!r}: use 'raw' or 'ema'")
    workdir, step = checkpoint.locate(path, which)
    config = run_record.recorded_config(workdir) if config is None else config
    ckpt = checkpoint.Checkpointer(workdir, keep=1, read_only=True)
    try:
        saved = ckpt.restore_params(step, ema=params == "ema")
    finally:
        ckpt.close()
    model, _, abstract = initial_state(config, train.create_mesh(), total_steps=1, abstract=True)
    merged, fresh = warm_start.merge_params(abstract.params, saved, f"{workdir} (step {step})")
    if fresh:
        raise UserError(f"{workdir} (step {step}) has another class count than the config "
                        f"({', '.join(fresh)}): load it with its own config")
    return Loaded(model, jax.tree.map(jax.numpy.asarray, merged), config, step)


# ---------------------------------------------------------------------------------------------
# --mode=attend
# ---------------------------------------------------------------------------------------------
@one_line
def attend(config: ml_collections.ConfigDict, workdir: str | Path, paths: list[str],
           which: str | int = "best", mesh=None, params: str = "raw") -> list[dict]:
    """--mode=attend: the attention map and top-5 classes of the trained model on each image.

    Restores checkpoint `which` ('best', 'latest' or a step) of `workdir` (its `params`, "raw" or
    "ema"), resizes each image to the
    dataset's image size, preprocesses it as evaluation does, and writes `workdir/attend/<name>.png`,
    the image beside its overlay. Returns, per image,
    {"image", "output", "top5": [(class name, probability), ...]}.
    """
    if not paths:
        raise UserError("--mode=attend needs at least one --image=PATH")
    paths = [Path(p) for p in paths]
    originals = [read_image(p) for p in paths]  # bad files fail before anything slow
    if not inference.has_attention_map(config):
        raise UserError(f"model {config.model.name!r} has no attention map: --mode=attend needs a "
                        "PatchConvNet (config.model.name patch_convnet_tutorial, patch_convnet or "
                        "a preset such as S60)")
    workdir = Path(workdir)
    run, step = _restored_run(config, workdir, which, mesh, params)
    size = run.splits["train"].image_shape[:2]  # the dataset's image size (after image_size)
    images = np.stack([inference.to_model_input(image, size) for image in originals])
    probs, attention = inference.predict(run.model, run.state.params, images, config.preprocess,
                                         run.stats)
    names = data.class_names(config.dataset)
    results = []
    for path, name, original, p, a in zip(paths, _output_names(paths), originals, probs, attention,
                                         strict=True):
        top5 = [(names[i], float(p[i])) for i in np.argsort(-p)[:5]]
        output = workdir / "attend" / f"{name}.png"
        title = (f"{path.name}: {top5[0][0]} ({top5[0][1]:.1%}); model input {size[1]}x{size[0]} "
                 f"-> {config.preprocess.size}x{config.preprocess.size}, checkpoint step {step}")
        if jax.process_index() == 0:
            attention_maps.render_side_by_side(original, a, output, title)
        results.append({"image": str(path), "output": str(output), "top5": top5})
    return results


def format_result(result: dict) -> str:
    """The console lines of one `attend` result: the image, its PNG and the top-5 classes."""
    lines = [f"{result['image']} -> {result['output']}"]
    width = max(len(name) for name, _ in result["top5"])
    lines += [f"  {rank}. {name:<{width}}  {prob:.4f}"
              for rank, (name, prob) in enumerate(result["top5"], 1)]
    return "\n".join(lines)


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique: a/cat.jpg, b/cat.png -> cat, cat_2."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names


def read_image(path: str | Path) -> np.ndarray:
    """The --image file, any image PIL reads (JPEG, PNG, ...) -> uint8 RGB [H, W, 3]: EXIF rotation
    applied, grayscale and palette expanded, transparency composited onto white; a file that is
    missing or no image is a `UserError` naming the flag."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--image={path}: no such file")
    if path.is_dir():
        raise UserError(f"--image={path}: is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            if img.mode.startswith("I") or img.mode == "F":  # 16- or 32-bit grey levels
                return _deep_grey_to_rgb(img, path)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            else:
                img = img.convert("RGB")
            return np.asarray(img, np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"--image={path}: not an image file (PIL cannot identify it)") from None
    except OSError as e:  # truncated or corrupt image data
        raise UserError(f"--image={path}: cannot read the image ({e})") from None


def _deep_grey_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit grey image (PNG, TIFF: PIL modes "I;16*", or "I" holding 0..65535) rescaled to
    0..255, not clipped (PIL's convert("RGB") turns every level above 255 white); deeper or floating
    point grey levels have no fixed range and are refused."""
    levels = np.asarray(img)
    if img.mode == "F" or (img.mode == "I" and (levels.min() < 0 or levels.max() > 65535)):
        raise UserError(f"--image={path}: {img.mode!r} grey levels beyond 16 bits have no fixed "
                        "range: save it as an 8- or 16-bit image")
    grey = np.round(levels.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
