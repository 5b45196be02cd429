r"""PatchConvNet-S60 (the paper's model, 25.2M parameters) on ImageNet-1k at 224 px, DeiT's recipe.

Published (Touvron et al. 2021, arXiv 2112.13692): 82.1% ImageNet val top-1, 25.2M params,
4.0 GFLOPs (multiply-adds). attn_jax counts 25,231,096 params and 3.979 G multiply-adds of convs
and matmuls (8.659 GFLOPs by XLA, which counts a multiply-add as 2), abstractly and offline:

    python launch.py --config=experiments/patch_convnet_s60_imagenet.py --mode=summary

Data: tfds `imagenet2012` (train 1,281,167 images, validation 50,000) is downloaded by hand, as
tfds documents: register at https://image-net.org/download-images, put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in `<data_dir>/downloads/manual/`, then

    tfds build imagenet2012 --file_format=array_record --data_dir=DIR   # ~150 GB; --manual_dir=...
    python launch.py --config=experiments/patch_convnet_s60_imagenet.py --workdir=runs/s60 \
        --config.dataset.data_dir=DIR

(val and test are both `validation`, where the paper reports; a TFRecord copy converts with
`python -m attn_jax.convert_dataset`). Each image is cropped to 224x224 at its true size on the
host, in grain's workers. Not yet run on real ImageNet; the crops are tested on images of several
sizes.

Recipe: DeiT's (Touvron et al. 2020, its Table 9 and the defaults of its `main.py`):
- AdamW, lr 5e-4 * 1024 / 512 = 1e-3 at global batch 1024 (accumulate_steps splits it where its
  activations do not fit), betas (0.9, 0.999), eps 1e-8, weight decay 0.05 scaled by the learning
  rate, 300 epochs, 5 linear warm-up epochs then cosine, no gradient clipping; label smoothing 0.1;
  no dropout; drop-path (the same rate in every block, as the official code); no decay on the class
  token and the 1-D parameters (biases, LayerNorms, layer-scales: timm's optimizer factory).
- Data: repeated augmentation (3 repeats, DeiT's RASampler); DeiT's crops (its `build_transform`
  through timm's `create_transform`): RandomResizedCrop(224, scale (0.08, 1), ratio (3/4, 4/3)),
  for evaluation Resize(256) then CenterCrop(224) (`--eval-crop-ratio` 0.875); horizontal flip;
  RandAugment `rand-m9-mstd0.5-inc1`; Mixup 0.8 / CutMix 1.0, one per batch (switch 0.5), every
  batch mixed; random erasing 0.25 (mode pixel); ImageNet's mean and std (timm's defaults).
- An EMA of the weights, decay 0.99996 without warm-up (`--model-ema`), evaluated beside the raw
  weights as val/ema_*; DeiT reports the raw model, as does the 'best' checkpoint here.
- Different from DeiT: warm-up from 0 and cosine to 0, stepped per step (DeiT: per epoch, from
  1e-6, to 1e-5); crops resized bilinearly with antialiasing (DeiT: bicubic); RandAugment's ops
  differ from PIL's where the README's "modern stack" section says.
- dtype "auto": bfloat16 compute on GPU/TPU (the official code trains with autocast), float32 on
  CPU; residual streams, LayerNorm and softmax stay float32.

The official weights (S60, 82.1%): `--mode=import --weights=S60.pth` makes them a checkpoint that
`--mode=eval|attend` and `--config.init_from` use (README, "Official PatchConvNet weights").

`:paper`: the paper's own recipe as its first author gives it (facebookresearch/deit issue #185):
LAMB, lr 3e-3, global batch 2048, the rest as above. drop_path_rate 0.05 is NOT verified against the
paper's table: check it before a full run; LAMB's weight decay is not stated either (0.05 kept).

`:smoke`: the whole recipe offline, a tiny member of the family (dim 32, depth 2, 2 stem convs) on
scikit-learn's digits at 32 px with every augmentation and the EMA, for 2 epochs (add
`--config.optimizer.name=lamb` for LAMB). It checks the path, not the recipe: 24 steps under this
much regularisation end near chance (about 10% test top-1).

    python launch.py --config=experiments/patch_convnet_s60_imagenet.py:smoke --workdir=runs/s60_smoke
"""

import ml_collections

from attn_jax.config import base
from attn_jax.experiment import check_variant

# The arguments get_config accepts: `--config=experiments/patch_convnet_s60_imagenet.py[:ARG]`.
VARIANTS = (None, "paper", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """S60 with DeiT's recipe on ImageNet-1k at 224 px; `arg`: "paper" (LAMB) or "smoke"."""
    check_variant(__file__, arg, VARIANTS)
    config = base()
    config.seed = 0
    config.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.num_epochs = 300
    config.log_every_steps = 250  # 1,251 steps per epoch
    config.attention_every_epochs = 5

    config.dataset.update(name="imagenet2012", num_classes=1000, download=False,  # by hand
                          train_split="train", val_split="validation", test_split="validation")
    config.dataset.image_size = 224  # each image cropped on the host at its true size (DeiT's)
    config.dataset.crop = "inception"  # training: RandomResizedCrop
    config.dataset.eval_crop_fraction = 0.875  # evaluation: shorter side 256, centre 224
    config.dataset.repeats = 3  # DeiT's RASampler

    config.preprocess.size = 224  # the host's crops are already 224x224: no resize on the device
    config.preprocess.train_resize = 224  # unused without a device crop
    config.preprocess.normalize = "imagenet"  # x / 255 standardised by ImageNet's mean, std
    config.preprocess.randaugment_ops = 2  # rand-m9-mstd0.5-inc1
    config.preprocess.erase_prob = 0.25  # timm RandomErasing, mode pixel

    # The preset: dim 384, depth 60, 4 stem convs, layer-scale 1e-4, class-MLP ratio 3
    config.model.update(name="S60", attention_dropout=0.0)
    config.model.drop_path_rate = 0.05  # unverified against the paper: see the docstring

    config.optimizer.learning_rate = 1e-3  # 5e-4 * batch 1024 / 512
    config.optimizer.warmup_fraction = 5 / 300  # 5 warm-up epochs of 300
    config.optimizer.weight_decay = 0.05
    config.optimizer.weight_decay_exclude = ("cls_token", "layer_scale", "bias", "scale")
    config.optimizer.eps = 1e-8  # PyTorch's AdamW default
    config.loss.label_smoothing = 0.1  # folded into Mixup/CutMix's targets, as timm's Mixup does
    config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    config.ema.decay = 0.99996  # DeiT's --model-ema: evaluated beside, the raw model reported
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
    config.dataset.update(name="sklearn_digits", num_classes=10, train_split="train[:1152]",
                          val_split="train[1152:]", test_split="test", image_size=32,
                          download=True, read_workers=0)  # download: from scikit-learn's copy
    config.batch_size = 96  # 3 repeats of 32 examples
    config.eval_batch_size = 96
    config.num_epochs = 2
    config.log_every_steps = 6
    config.preprocess.size = 32
    config.preprocess.train_resize = 32
    config.preprocess.flip = False  # a mirrored digit is another glyph
    config.model.update(name="patch_convnet", dim=32, depth=2, stem_convs=2, layer_scale_init=1e-4,
                        mlp_ratio=3.0)
    config.ema.decay = 0.99
    config.optimizer.warmup_fraction = 0.2
