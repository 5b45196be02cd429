"""Pictures of where the model looks, and training curves, rendered from the arrays they are given.

A PatchConvNet's class token attends over the patches of the last feature map; its softmax weights
(`attention`, [B, N] summing to 1, N = h * w patches) reshaped to h x w and stretched over the image
show which regions the classification rests on (the Keras tutorial's `TrainMonitor` and
`plot_attention`: inferno colormap at alpha 0.6 over the image).

- `render_grid`: a grid of images overlaid with their maps, one title each; `render_epoch_grid`, the
  grid training draws after an epoch from the model's predictions (`train._end_epoch`:
  `DIR/attention/epoch_005.png` and TensorBoard).
- `render_side_by_side`: an image beside its overlay (`--mode=attend`: `modes.attend`,
  `DIR/attend/<name>.png`).
- `plot_curves`: `DIR/curves.png`, train and validation loss and top-1 against epochs.

This module takes numpy arrays (uint8 images, attention weights) and a run's `metrics.jsonl`; it
knows nothing of models, checkpoints or datasets (`inference` computes the predictions). Everything
renders headless on matplotlib's Agg canvas, attached to each figure explicitly (no pyplot, so the
process-wide backend of a notebook importing attn_jax is left alone), into PNGs of a fixed pixel
size.
"""

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from attn_jax import atomic

CMAP = "inferno"  # as the tutorial
ALPHA = 0.6
DPI = 100
CELL_INCHES = (2.4, 2.8)  # one image of the training grid (width, height): image + 2 title lines
ATTEND_INCHES = (8.0, 4.6)  # --mode=attend: input | overlay
CURVES_INCHES = (10.0, 4.0)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def attention_grid(attention: np.ndarray) -> np.ndarray:
    """Attention weights [n, N] -> [n, h, h] maps, h = sqrt(N) (the patches of a square image)."""
    side = math.isqrt(attention.shape[-1])
    if side * side != attention.shape[-1]:
        raise ValueError(f"{attention.shape[-1]} patches do not make a square grid")
    return attention.reshape(*attention.shape[:-1], side, side)


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
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    atomic.write_bytes(path, png.getvalue())  # whole or not at all, as a signal may stop --mode=attend
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


def render_epoch_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                      attention: np.ndarray, class_names: list[str], title: str,
                      path: Path) -> np.ndarray:
    """`render_grid` of a model's predictions: uint8 images [n, H, W, 3], int labels [n], class
    probabilities [n, C] and attention [n, N]; each image titled with its true and predicted class
    (green when right, red when wrong), the grid with `title` and the count of right predictions.
    Writes the PNG and returns its pixels."""
    predicted = probs.argmax(-1)
    titles = [f"true {class_names[t]}\npred {class_names[p]} ({probs[i, p]:.0%})"
              for i, (t, p) in enumerate(zip(labels, predicted, strict=True))]
    colors = ["green" if t == p else "red" for t, p in zip(labels, predicted, strict=True)]
    correct = int(np.sum(labels == predicted))
    return render_grid(images, attention, titles, path, colors=colors,
                       suptitle=f"{title}: {correct}/{len(labels)} correct (green)")


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
# Training curves
# ---------------------------------------------------------------------------------------------
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

