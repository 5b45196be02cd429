"""Where the model looks: attention maps during training and on any image, and training curves.

A PatchConvNet's class token attends over the patches of the last feature map; its softmax weights
(`attention`, [B, N] summing to 1, N = h * w patches) reshaped to h x w and stretched over the image
show which regions the classification rests on (the Keras tutorial's `TrainMonitor` and
`plot_attention`: inferno colormap at alpha 0.6 over the image).

- `render_epoch`: during training, every `config.attention_every_epochs` epochs, a grid of the
  first `config.attention_images` validation images (the same ones every time) with their maps,
  titled with the true and predicted class: `DIR/attention/epoch_005.png` and TensorBoard.
- `attend`: `launch.py --mode=attend --image=PATH ...` restores a trained model, reads any image
  (JPEG, PNG, ...; any size; grayscale, RGB or RGBA), prints the top-5 classes and writes
  `DIR/attend/<name>.png`, the input and its overlay side by side.
- `plot_curves`: `DIR/curves.png`, train and validation loss and top-1 against epochs.

Everything renders headless on matplotlib's Agg canvas, attached to each figure explicitly (no
pyplot, so the process-wide backend of a notebook importing attn_jax is left alone), into PNGs of a
fixed pixel size.
"""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps, UnidentifiedImageError

from attn_jax import preprocess
from attn_jax.errors import UserError

# attn_jax.data, .checkpoint and .train (TensorFlow, orbax) are imported where they are used, so a
# mistyped --image fails in the time it takes to import jax.

CMAP = "inferno"  # as the tutorial
ALPHA = 0.6
DPI = 100
CELL_INCHES = (2.4, 2.8)  # one image of the training grid (width, height): image + 2 title lines
ATTEND_INCHES = (8.0, 4.6)  # --mode=attend: input | overlay
CURVES_INCHES = (10.0, 4.0)


# ---------------------------------------------------------------------------------------------
# The model's view: images -> probabilities and attention maps
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "preprocess_cfg"))
def _predict(params, images, stats, *, model, preprocess_cfg):
    inputs = preprocess.for_eval(images, preprocess_cfg, stats)
    logits, attention = model.apply({"params": params}, inputs, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), attention


def _local(tree):
    """This process's first copy of each (replicated) array: computing on it needs no other device
    or process."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def predict(model, params, images: np.ndarray, preprocess_cfg: ml_collections.ConfigDict,
            stats=None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [n, H, W, 3] -> (class probabilities [n, C], attention [n, N] or None), with
    evaluation's preprocessing (`preprocess.for_eval`). Jitted, on one device of this process (the
    params and stats are replicated: their local copy is used); compiled once per model and shape."""
    frozen = ml_collections.FrozenConfigDict(preprocess_cfg)
    probs, attention = _predict(_local(params), jnp.asarray(images, jnp.uint8), _local(stats),
                                model=model, preprocess_cfg=frozen)
    return np.asarray(probs), None if attention is None else np.asarray(attention, np.float32)


def has_attention_map(config: ml_collections.ConfigDict) -> bool:
    """Whether config's model returns an attention map, found abstractly (no weights, no data)."""
    from attn_jax.train import create_model

    model = create_model(config, config.dataset.num_classes)
    size = config.preprocess.size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    (_, attention), _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                                       jax.random.key(0), images)
    return attention is not None


def attention_grid(attention: np.ndarray) -> np.ndarray:
    """Attention weights [n, N] -> [n, h, h] maps, h = sqrt(N) (the patches of a square image)."""
    side = math.isqrt(attention.shape[-1])
    if side * side != attention.shape[-1]:
        raise ValueError(f"{attention.shape[-1]} patches do not make a square grid")
    return attention.reshape(*attention.shape[:-1], side, side)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def overlay(ax, image: np.ndarray, attention_map: np.ndarray, title: str = "",
            color: str = "black") -> None:
    """Draws uint8 `image` [H, W, 3] with `attention_map` [h, w] stretched over it on `ax`."""
    shown = ax.imshow(image)
    ax.imshow(attention_map, cmap=CMAP, alpha=ALPHA, extent=shown.get_extent())
    ax.set_title(title, fontsize=9, color=color)
    ax.axis("off")


def _figure(inches: tuple[float, float]) -> Figure:
    """A figure of `inches` at DPI on an Agg canvas (headless, outside pyplot)."""
    fig = Figure(figsize=inches, dpi=DPI, layout="constrained")  # titles never overlap images
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> np.ndarray:
    """Renders `fig` to `path` (a PNG of exactly figsize * DPI pixels); returns its RGB pixels."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the training grid of n images: as square as possible."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def grid_pixels(n: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `render_grid` writes for n images."""
    rows, cols = grid_shape(n)
    return round(cols * CELL_INCHES[0] * DPI), round(rows * CELL_INCHES[1] * DPI)


def render_grid(images: np.ndarray, attention: np.ndarray, titles: list[str], path: Path,
                suptitle: str = "", colors: list[str] | None = None) -> np.ndarray:
    """A grid of overlays: uint8 images [n, H, W, 3], attention [n, N], one title per image.
    Writes the PNG (`grid_pixels(n)` in size) and returns its pixels."""
    rows, cols = grid_shape(len(images))
    fig = _figure((cols * CELL_INCHES[0], rows * CELL_INCHES[1]))
    axes = fig.subplots(rows, cols, squeeze=False)
    maps = attention_grid(attention)
    colors = colors or ["black"] * len(images)
    for ax, image, amap, title, color in zip(axes.flat, images, maps, titles, colors, strict=False):
        overlay(ax, image, amap, title, color)
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return _save(fig, path)


def render_side_by_side(image: np.ndarray, attention: np.ndarray, path: Path,
                        title: str = "") -> np.ndarray:
    """`image` (uint8 [H, W, 3], any size) beside the same image overlaid with `attention` [N]."""
    fig = _figure(ATTEND_INCHES)
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title(f"input ({image.shape[1]}x{image.shape[0]})", fontsize=10)
    left.axis("off")
    overlay(right, image, attention_grid(attention[None])[0], "attention of the class token")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------
def fixed_images(split, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n examples of `split` (a `data.Split`) in its stored order, (uint8 images, int
    labels): the same every time it is called."""
    images, labels = split.examples.read(np.arange(min(n, split.num_examples)))
    if not len(labels):
        raise UserError("the validation split is empty: no images to draw attention maps on")
    return images, labels


def render_epoch(run, log, epoch: int) -> Path | None:
    """The attention grid of `run`'s current state on the fixed validation images, written to
    `log.workdir/attention/epoch_XXX.png` and TensorBoard (as "attention_maps" at the current step).

    Returns the PNG's path, or None on processes other than 0 (which do nothing) and for a model
    without an attention map (which is said on the console)."""
    from attn_jax import data

    if not log.is_writer:
        return None
    config = run.config
    images, labels = fixed_images(run.splits["val"], config.get("attention_images", 16))
    probs, attention = predict(run.model, run.state.params, images, config.preprocess, run.stats)
    if attention is None:
        log.info(f"model {config.model.name!r} has no attention map: no attention/ grid "
                 "(set config.attention_every_epochs = 0)")
        return None
    names = data.class_names(config.dataset)
    predicted = probs.argmax(-1)
    titles = [f"true {names[t]}\npred {names[p]} ({probs[i, p]:.0%})"
              for i, (t, p) in enumerate(zip(labels, predicted, strict=True))]
    colors = ["green" if t == p else "red" for t, p in zip(labels, predicted, strict=True)]
    correct = int(np.sum(labels == predicted))
    path = log.workdir / "attention" / f"epoch_{epoch:03d}.png"
    pixels = render_grid(images, attention, titles, path, colors=colors,
                         suptitle=f"{config.model.name}, epoch {epoch}: {correct}/{len(labels)} "
                                  "correct (green)")
    log.write_image(int(run.state.step), "attention_maps", pixels)
    return path


def _epoch_means(records: list[dict], prefix: str) -> dict[int, dict[str, float]]:
    """Per epoch, the step-weighted mean of the `prefix/loss` and `prefix/top1` records."""
    sums: dict[int, dict[str, float]] = {}
    last_step = 0
    for record in records:
        if f"{prefix}/loss" not in record:
            continue
        weight = max(record["step"] - last_step, 1) if prefix == "train" else 1
        last_step = record["step"]
        acc = sums.setdefault(record["epoch"], {"loss": 0.0, "top1": 0.0, "weight": 0})
        acc["loss"] += weight * record[f"{prefix}/loss"]
        acc["top1"] += weight * record[f"{prefix}/top1"]
        acc["weight"] += weight
    return {e: {k: v / a["weight"] for k, v in a.items() if k != "weight"}
            for e, a in sorted(sums.items())}


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Train and validation loss and top-1 against epochs, from a run's `metrics.jsonl`.

    A train point is the mean over the epoch's steps (the log intervals weighted by their length,
    as Keras reports an epoch); a validation point is the evaluation after the epoch.
    """
    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines()
               if line.strip()]
    fig = _figure(CURVES_INCHES)
    loss_ax, top1_ax = fig.subplots(1, 2)
    for prefix, style in (("train", "o-"), ("val", "s-")):
        means = _epoch_means(records, prefix)
        epochs = list(means)
        loss_ax.plot(epochs, [means[e]["loss"] for e in epochs], style, ms=3, label=prefix)
        top1_ax.plot(epochs, [100 * means[e]["top1"] for e in epochs], style, ms=3, label=prefix)
    test = [r for r in records if "test/top1" in r]
    if test:
        top1_ax.plot([test[-1]["epoch"]], [100 * test[-1]["test/top1"]], "*", ms=10,
                     label=f"test {100 * test[-1]['test/top1']:.2f}%")
    for ax, name in ((loss_ax, "loss"), (top1_ax, "top-1 (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    out_png = Path(out_png)
    _save(fig, out_png)
    return out_png


# ---------------------------------------------------------------------------------------------
# --mode=attend
# ---------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> np.ndarray:
    """Any image file PIL reads (JPEG, PNG, ...) -> uint8 RGB [H, W, 3]: EXIF rotation applied,
    grayscale and palette expanded, transparency composited onto white."""
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


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] of any size -> uint8 [size[0], size[1], 3], the dataset's image size, as the
    tutorial resizes an arbitrary image before its evaluation preprocessing (bilinear; PIL filters
    over the whole footprint when shrinking, so a large photo does not alias)."""
    if image.shape[:2] == tuple(size):
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def _output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique: a/cat.jpg, b/cat.png -> cat, cat_2."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names


def attend(config: ml_collections.ConfigDict, workdir: str | Path, paths: list[str],
           which: str = "best", mesh=None) -> list[dict]:
    """--mode=attend: the attention map and top-5 classes of the trained model on each image.

    Restores checkpoint `which` ('best', 'latest' or a step) of `workdir`, resizes each image to the
    dataset's image size, preprocesses it as evaluation does, and writes `workdir/attend/<name>.png`.
    Returns, per image, {"image", "output", "top5": [(class name, probability), ...]}.
    """
    if not paths:
        raise UserError("--mode=attend needs at least one --image=PATH")
    paths = [Path(p) for p in paths]
    originals = [read_image(p) for p in paths]  # bad files fail before anything slow
    if not has_attention_map(config):
        raise UserError(f"model {config.model.name!r} has no attention map: --mode=attend needs a "
                        "PatchConvNet (config.model.name patch_convnet_tutorial, patch_convnet or "
                        "a preset such as S60)")
    from attn_jax import checkpoint, data, train

    workdir = Path(workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep, read_only=True)
    try:
        step = ckpt.resolve(which)
        run = train.build_run(config, train.create_mesh() if mesh is None else mesh, workdir)
        run.state, _ = ckpt.restore(step, run.state, train.zero_sums(run.mesh),
                                    checkpoint.model_description(config))
    finally:
        ckpt.close()

    size = run.splits["train"].image_shape[:2]  # the dataset's image size (after image_size)
    images = np.stack([to_model_input(image, size) for image in originals])
    probs, attention = predict(run.model, run.state.params, images, config.preprocess, run.stats)
    names = data.class_names(config.dataset)
    results = []
    for path, name, original, p, a in zip(paths, _output_names(paths), originals, probs, attention,
                                         strict=True):
        top = np.argsort(-p)[:5]
        top5 = [(names[i], float(p[i])) for i in top]
        output = workdir / "attend" / f"{name}.png"
        title = (f"{path.name}: {top5[0][0]} ({top5[0][1]:.1%}); model input {size[1]}x{size[0]} "
                 f"-> {config.preprocess.size}x{config.preprocess.size}, checkpoint step {step}")
        if jax.process_index() == 0:
            render_side_by_side(original, a, output, title)
        results.append({"image": str(path), "output": str(output), "top5": top5})
    return results


def format_result(result: dict) -> str:
    """The console lines of one `attend` result: the image, its PNG and the top-5 classes."""
    lines = [f"{result['image']} -> {result['output']}"]
    width = max(len(name) for name, _ in result["top5"])
    lines += [f"  {rank}. {name:<{width}}  {prob:.4f}"
              for rank, (name, prob) in enumerate(result["top5"], 1)]
    return "\n".join(lines)
