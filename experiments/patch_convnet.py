r"""PatchConvNet, the Keras tutorial's (keras.io/examples/vision/patch_convnet), on CIFAR-10.

    python launch.py --config=experiments/patch_convnet.py --workdir=runs/patch_convnet

The tutorial's recipe: 50 epochs at batch 128; AdamW lr 1e-3, weight decay 1e-4 per step
(tensorflow-addons), a 15% linear warm-up then cosine; resize 32 -> 52, random crop 48, flip, x / 255;
Keras' validation_split=0.2; attention maps every 5 epochs (its TrainMonitor(epoch_interval=5)).
Needs tfds `cifar10` in config.dataset.data_dir (or network access to download it).

Published (keras-io, one GPU run): 84.59% test top-1, 99.21% top-5; validation top-1 37.8, 64.2,
76.2, 82.2, 84.1, 86.1 and 84.8% after epochs 1, 5, 10, 20, 30, 40 and 50. 1,436,426 trainable
parameters: the tutorial's trunk applies one shared block twice (model.tie_trunk; False gives two
independent blocks, 2,174,986).

`:modern`: the same network and data geometry under the modern stack, 50 epochs at batch 128, aiming
at 90% CIFAR-10 validation top-1 (the tutorial recipe: 84.6% test). Its values are the CIFAR-10
recipe of CCT (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers";
SHI-Labs/Compact-Transformers `configs/pretrained/cct_7-3x1_cifar10_300epochs.yml`, batch 128 as
here), which takes them from DeiT: AdamW lr 5.5e-4, weight decay 0.06 scaled by the learning rate,
label smoothing 0.1, RandAugment `rand-m9-mstd0.5-inc1`, Mixup 0.8 / CutMix 1.0 (switch 0.5, every
batch mixed); eps 1e-8 (PyTorch's default, as there); 5 warm-up epochs (DeiT's; CCT warms up 10 of
300) then cosine; no dropout (DeiT); no weight decay on biases, LayerNorms and the class token
(timm's optimizer factory); an EMA with timm's default decay 0.9998 (`--model-ema-decay`), with
TensorFlow's warm-up so that the first epochs' average is not the initialisation. Not taken: CCT's
random-resized crop, repeated augmentation, random erasing (0 there), its 300 epochs and its Mixup
switched off after 175.

    python launch.py --config=experiments/patch_convnet.py:modern --workdir=runs/patch_convnet_modern

`:smoke`: a small PatchConvNet on scikit-learn's 8x8 digits (ships with the package, offline), a
minute or so on a CPU; it should reach about 95% test top-1:

    python launch.py --config=experiments/patch_convnet.py:smoke --workdir=runs/smoke
"""

import ml_collections

from attn_jax.config import base
from attn_jax.experiment import check_variant

# The arguments get_config accepts: `--config=experiments/patch_convnet.py[:ARG]`.
VARIANTS = (None, "smoke", "modern")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tutorial recipe; `arg="smoke"` gives the small offline run, `arg="modern"` the modern
    recipe."""
    check_variant(__file__, arg, VARIANTS)
    config = base()
    config.preprocess.size = 48  # evaluation: resize 32 -> 48
    config.preprocess.train_resize = 52  # training: resize 32 -> 52, random crop 48, flip
    config.preprocess.crop = 48
    config.optimizer.weight_decay_mode = "per_step"  # tensorflow-addons AdamW, as the tutorial
    config.attention_every_epochs = 5
    config.model.update(name="patch_convnet_tutorial", dim=256, depth=2, se_ratio=8,
                        attention_dropout=0.2, mlp_dropout=0.2)
    # The tutorial's Trunk wraps ONE list of layers `depth` times, so its blocks share their weights:
    # the model behind the published 84.59%. False: independent blocks, as its prose and the paper.
    config.model.tie_trunk = True
    if arg == "smoke":
        _smoke(config)
    elif arg == "modern":
        _modern(config)
    return config


def _modern(config: ml_collections.ConfigDict) -> None:
    """The tutorial's network and data under a modern recipe (sources in the docstring)."""
    config.optimizer.learning_rate = 5.5e-4  # CCT's CIFAR-10 recipe, batch 128
    config.optimizer.weight_decay = 0.06  # CCT
    config.optimizer.weight_decay_mode = "lr_scaled"  # PyTorch / optax AdamW, as timm
    config.optimizer.weight_decay_exclude = ("bias", "scale", "cls_token")  # timm: 1-D + no_weight_decay
    config.optimizer.eps = 1e-8  # PyTorch's default
    config.optimizer.warmup_fraction = 0.1  # 5 epochs of 50: DeiT's warm-up
    config.loss.label_smoothing = 0.1  # CCT, DeiT
    config.preprocess.randaugment_ops = 2  # rand-m9-mstd0.5-inc1: CCT, DeiT
    config.preprocess.randaugment_magnitude = 9.0
    config.preprocess.randaugment_magnitude_std = 0.5
    config.mixup.mixup_alpha = 0.8  # CCT, DeiT
    config.mixup.cutmix_alpha = 1.0
    config.mixup.switch_prob = 0.5
    config.mixup.prob = 1.0
    config.model.attention_dropout = 0.0  # DeiT: no dropout under this augmentation
    config.model.mlp_dropout = 0.0
    config.ema.decay = 0.9998  # timm's --model-ema-decay default
    config.ema.warmup = True  # so that the early epochs' EMA is not the initialisation


def _smoke(config: ml_collections.ConfigDict) -> None:
    """A small PatchConvNet on scikit-learn's 8x8 digits (upscaled to 32x32): offline, minutes."""
    config.dataset.name = "sklearn_digits"
    config.dataset.train_split = "train[:1150]"
    config.dataset.val_split = "train[1150:]"
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = 30
    config.log_every_steps = 18
    config.preprocess.size = 32
    config.preprocess.train_resize = 36
    config.preprocess.crop = 32
    config.preprocess.flip = False  # a mirrored digit is another glyph
    config.model.dim = 64
    config.model.depth = 1
