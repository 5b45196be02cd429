r"""PatchConvNet-S60 (the paper's model, 25.2M parameters) on ImageNet-1k at 224 px.

Published (Touvron et al. 2021, arXiv 2112.13692): 82.1% ImageNet val top-1, 25.2M params,
4.0 GFLOPs (multiply-adds). attn_jax counts 25,231,096 params and 3.979 G multiply-adds of convs
and matmuls (8.659 GFLOPs by XLA's cost analysis, which counts a multiply-add as 2 and every op):

    python launch.py --config=experiments/patch_convnet_s60_imagenet.py --mode=summary

The summary is abstract (no weights, no dataset): it works offline and takes seconds.

Data. tfds `imagenet2012` (train 1,281,167 images, validation 50,000) must be downloaded by hand,
as tfds documents: register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in `<data_dir>/downloads/manual/`, then

    tfds build imagenet2012 --file_format=array_record --data_dir=DIR   # ~150 GB; --manual_dir=...

and train with

    python launch.py --config=experiments/patch_convnet_s60_imagenet.py --workdir=runs/s60 \
        --config.dataset.data_dir=DIR

(train = `train`, val and test = `validation`, which is where the paper reports its number).

ImageNet's images differ in size, so they reach 224x224 on the host, each at its true size, before
batching, in grain's worker processes (config.dataset.crop = "inception", eval_crop_fraction =
0.875; PIL bilinear, antialiased): training takes Inception's random-resized crop, evaluation
resizes the shorter side to 256 and keeps the centre 224x224. The training split streams (a copy
prepared as TFRecord: convert it with `python -m attn_jax.convert_dataset`). The flip runs on the
device. Untested on real ImageNet here (it cannot be downloaded offline); the crops are tested on
images of several sizes and aspect ratios.

Recipe: DeiT's (Touvron et al. 2020, its Table 9, and the defaults of its `main.py`), every value
set below:

- AdamW, lr 5e-4 * 1024 / 512 = 1e-3 at global batch 1024, betas (0.9, 0.999), eps 1e-8, weight
  decay 0.05 scaled by the learning rate (optax / PyTorch convention), 300 epochs, linear warm-up
  over 5 epochs then cosine decay, no gradient clipping; label smoothing 0.1; no dropout;
  drop-path (the same rate in every block, as the official code); the class token and every 1-D
  parameter (biases, LayerNorms, layer-scales) are not decayed.
- Data: a fresh permutation of the training split every epoch with repeated augmentation (3
  repeats, DeiT's RASampler); DeiT's crops (its datasets.py `build_transform`, through timm's
  `create_transform`): RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)) for training, and
  for evaluation Resize(int(224 / 0.875) = 256) of the shorter side then CenterCrop(224)
  (`--eval-crop-ratio` 0.875); horizontal flip; RandAugment `rand-m9-mstd0.5-inc1` (2 ops,
  magnitude 9, noise 0.5); Mixup (alpha 0.8) and CutMix (alpha 1.0), one of them per batch (switch
  probability 0.5), every batch mixed; random erasing (probability 0.25, mode pixel).
- An EMA of the weights, decay 0.99996 without warm-up (`--model-ema`): evaluated beside the raw
  weights as val/ema_*; DeiT reports the raw model, and so does the 'best' checkpoint here.
- Inputs standardised with ImageNet's mean and std (timm's IMAGENET_DEFAULT_MEAN / STD, as DeiT
  and the official weights); no weight decay on the 1-D parameters (biases, LayerNorms,
  layer-scales) nor on the class token (timm's optimizer factory with the model's
  `no_weight_decay`, as DeiT trains).
- Different from DeiT: the warm-up starts from 0 and the cosine ends at 0, stepped per step (DeiT:
  per epoch, warm-up from 1e-6, cosine to a floor of 1e-5); the crops are resized bilinearly with
  PIL's antialiasing (DeiT: bicubic); RandAugment's ops differ from PIL's where the README's
  "modern stack" section says.

The official weights (S60, 82.1%): `--mode=import --weights=S60.pth` makes them a checkpoint of a
new workdir, which `--mode=eval|attend` restore with this config and `--config.init_from` fine-tunes
from (README, "Official PatchConvNet weights"). Their evaluation here differs from DeiT's only by
the resize of the crop (bilinear with antialiasing, DeiT's bicubic).

`:paper` is the paper's own recipe as its first author gives it (facebookresearch/deit issue #185):
LAMB instead of AdamW, lr 3e-3, global batch 2048, the rest as above. Stochastic depth "depending on
the size of the model" is in the paper's table, which was not reachable here: drop_path_rate 0.05 is
NOT verified, check it before a full run; LAMB's weight decay is not stated there either (0.05 kept).

`:smoke` runs the whole recipe end to end offline: a tiny member of the family (dim 32, depth 2, 2
stem convs) on scikit-learn's digits at 32 px, with every augmentation and the EMA, for 2 epochs
(add `--config.optimizer.name=lamb` for the paper's optimiser):

    python launch.py --config=experiments/patch_convnet_s60_imagenet.py:smoke --workdir=runs/s60_smoke

It checks the path, not the recipe's accuracy: on this project's 2-core CPU it took 52 s and ended
at chance (10.6% test top-1), as 24 steps under this much regularisation teach nothing (12 epochs
with the augmentations off reach 24% top-1).

Mixed precision: dtype "auto" computes in bfloat16 on GPU/TPU (the official code trains with
autocast) and float32 on CPU; residual streams, LayerNorm and softmax stay float32.
"""

import ml_collections

from attn_jax.experiment import sibling_config

# The arguments get_config accepts: `--config=experiments/patch_convnet_s60_imagenet.py[:ARG]`.
VARIANTS = (None, "paper", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """S60 with DeiT's recipe on ImageNet-1k at 224 px; `arg`: "paper" (LAMB) or "smoke"."""
    if arg not in (None, "paper", "smoke"):
        raise ValueError(f"unknown config argument {arg!r}: use ':paper', ':smoke' or nothing")
    # The tutorial experiment's config: the schema every experiment follows; every value of the
    # recipe is set again below.
    config = sibling_config(__file__, "patch_convnet")
    config.seed = 0
    config.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
    config.batch_size = 1024  # global, over all devices
    config.eval_batch_size = 1000
    config.accumulate_steps = 1  # e.g. 4 where 1024 images' activations do not fit
    config.num_epochs = 300
    config.log_every_steps = 250  # 1,251 steps per epoch

    config.dataset.name = "imagenet2012"
    config.dataset.num_classes = 1000
    config.dataset.download = False  # manual download only (see the docstring)
    config.dataset.train_split = "train"
    config.dataset.val_split = "validation"
    config.dataset.test_split = "validation"  # ImageNet's test labels are not public
    # Images differ in size: each is cropped at its true size to 224x224 on the host (DeiT's crops)
    config.dataset.image_size = 224
    config.dataset.crop = "inception"  # training: RandomResizedCrop
    config.dataset.crop_scale = (0.08, 1.0)
    config.dataset.crop_ratio = (3 / 4, 4 / 3)
    config.dataset.eval_crop_fraction = 0.875  # evaluation: shorter side 256, centre 224
    config.dataset.prefetch = 2
    config.dataset.repeats = 3  # DeiT's RASampler

    config.preprocess.size = 224  # the host's crops are already 224x224: no resize on the device
    config.preprocess.train_resize = 224  # unused without a device crop
    config.preprocess.crop = 0  # the random crop is the host's Inception crop
    config.preprocess.flip = True
    config.preprocess.rotation = 0.0
    config.preprocess.contrast = 0.0
    config.preprocess.zoom = 0.0
    config.preprocess.normalize = "imagenet"  # DeiT's: x / 255 standardised by ImageNet's mean, std
    config.preprocess.randaugment_ops = 2  # rand-m9-mstd0.5-inc1
    config.preprocess.randaugment_magnitude = 9.0
    config.preprocess.randaugment_magnitude_std = 0.5
    config.preprocess.erase_prob = 0.25  # timm RandomErasing, mode pixel
    config.preprocess.erase_area = (0.02, 1 / 3)
    config.preprocess.erase_aspect = (0.3, 1 / 0.3)

    # The preset fixes the architecture (dim 384, depth 60, 4 stem convs, layer-scale 1e-4, class
    # MLP ratio 3); num_classes and dtype come from the dataset and config.dtype.
    config.model = ml_collections.ConfigDict()
    config.model.name = "S60"
    # How the model is computed, not what: "reference" (plain Flax layers), "fast" (attn_jax.fast:
    # same parameters and function, faster on CPU) or "auto" (fast on CPU, reference elsewhere).
    config.model.impl = "auto"
    config.model.drop_path_rate = 0.05  # unverified against the paper: see the docstring
    config.model.attention_dropout = 0.0

    config.optimizer.name = "adamw"
    config.optimizer.clip_grad_norm = 0.0  # DeiT: no clipping
    config.optimizer.learning_rate = 1e-3  # 5e-4 * batch 1024 / 512
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_fraction = 5 / 300  # 5 warm-up epochs of 300
    config.optimizer.weight_decay = 0.05
    config.optimizer.weight_decay_mode = "lr_scaled"
    # timm: no decay on 1-D parameters (biases, LayerNorm scales, layer-scales) + no_weight_decay()
    config.optimizer.weight_decay_exclude = ("cls_token", "layer_scale", "bias", "scale")
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8  # PyTorch's AdamW default

    config.loss.label_smoothing = 0.1  # folded into Mixup/CutMix's targets, as timm's Mixup does
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.mixup.switch_prob = 0.5
    config.mixup.prob = 1.0
    config.ema.decay = 0.99996  # DeiT's --model-ema: evaluated beside, the raw model reported
    config.ema.warmup = False
    if arg == "paper":
        _paper(config)
    elif arg == "smoke":
        _smoke(config)
    return config


def _paper(config: ml_collections.ConfigDict) -> None:
    """The paper's own optimiser, learning rate and batch (deit issue #185; see the docstring)."""
    config.optimizer.name = "lamb"
    config.optimizer.learning_rate = 3e-3
    config.batch_size = 2048
    config.log_every_steps = 125  # 625 steps per epoch


def _smoke(config: ml_collections.ConfigDict) -> None:
    """The recipe on scikit-learn's digits with a tiny member of the family: offline, a minute."""
    config.dataset.name = "sklearn_digits"
    config.dataset.num_classes = 10
    config.dataset.download = True  # prepared from scikit-learn's copy, no network
    config.dataset.train_split = "train[:1152]"
    config.dataset.val_split = "train[1152:]"
    config.dataset.test_split = "test"
    config.dataset.image_size = 32
    config.dataset.read_workers = 0
    config.batch_size = 96  # 3 repeats of 32 examples
    config.eval_batch_size = 96
    config.num_epochs = 2
    config.log_every_steps = 6
    config.preprocess.size = 32
    config.preprocess.train_resize = 32
    config.preprocess.flip = False  # a mirrored digit is another glyph
    config.model.name = "patch_convnet"
    config.model.dim = 32
    config.model.depth = 2
    config.model.stem_convs = 2
    config.model.layer_scale_init = 1e-4
    config.model.mlp_ratio = 3.0
    config.ema.decay = 0.99
    config.optimizer.warmup_fraction = 0.2
