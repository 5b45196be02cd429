r"""PatchConvNet, Keras tutorial version, on CIFAR-10 (reference-models.md section 1).

Full run (tutorial recipe: 50 epochs, batch 128, AdamW 1e-3 / wd 1e-4, warm-up 15% + cosine):

    python launch.py --config=experiments/patch_convnet.py --workdir=runs/patch_convnet

Published (keras-io, one GPU run): 84.59% test top-1, 99.21% top-5; validation top-1 37.8% after
epoch 1 and 45.9% after epoch 2. 1,436,426 trainable parameters: the tutorial's trunk applies one
shared block twice (config.model.tie_trunk; --config.model.tie_trunk=False gives two independent
blocks, 2,174,986). Needs tfds `cifar10` prepared in config.dataset.data_dir (or
network access to download it), e.g. --config.dataset.data_dir=../shared/tfds_array_record (train
split only: there, also set --config.dataset.test_split='train[40000:]').

The full schedule, measured on this project's 2-core CPU (AMD EPYC Zen 5; JAX 0.10.2; 2026-12-03)
on ../shared/tfds_array_record (JPEG-recoded CIFAR-10; validation and test both train[40000:]),
with --config.steps_per_call=8 --config.log_every_steps=104: validation top-1 after epochs 1, 5,
10, 20, 30, 40 and 50: 37.7, 63.0, 73.0, 80.3, 82.0, 83.8, 82.7% (published 37.8, 64.2, 76.2, 82.2,
84.1, 86.1, 84.8%; test 84.59%), top-5 99.0% after 50 (published test 99.21%); 224 training
images/s, 2 h 43 min from launch to the last evaluation.

Modern recipe (`:modern`): the same network and data geometry (resize 52, random crop 48, flip,
x / 255), trained with the modern stack for 50 epochs at batch 128 on CIFAR-10:

    python launch.py --config=experiments/patch_convnet.py:modern --workdir=runs/patch_convnet_modern

Where each value comes from: AdamW at lr 5.5e-4 with weight decay 0.06 (scaled by the learning
rate), label smoothing 0.1, RandAugment `rand-m9-mstd0.5-inc1` (2 ops), Mixup 0.8 and CutMix 1.0
(switch probability 0.5, every batch mixed): the CIFAR-10 recipe of CCT (Hassani et al. 2021,
"Escaping the Big Data Paradigm with Compact Transformers"; SHI-Labs/Compact-Transformers
`configs/pretrained/cct_7-3x1_cifar10_300epochs.yml`, batch 128 as here), which takes them from
DeiT; eps 1e-8 (PyTorch's default, as there); 5 warm-up epochs (DeiT's; CCT warms up 10 of 300)
then cosine; no dropout (DeiT trains without; the tutorial's 0.2 attention and MLP dropouts are
off); no weight decay on biases, LayerNorms and the class token (timm's optimizer factory, which
CCT and DeiT use); an EMA of the weights with timm's default decay 0.9998 (`--model-ema-decay`),
with TensorFlow's warm-up so that the first epochs' average is not the initialisation, evaluated
beside the raw weights (val/ema_top1). Not taken: CCT's random-resized crop (the tutorial's resize
and crop stay), repeated augmentation (neither CCT nor a 50-epoch schedule uses it), random erasing
(0 in that CCT config), CCT's 300 epochs and its Mixup switched off after 175.

The goal, for a GPU (issue 18): at least 90% CIFAR-10 validation top-1 in 50 epochs (the tutorial
recipe: 84.6% test). Measured here, epoch 1 of the 50-epoch schedule (`../shared/tfds_array_record`
as above, stopped with SIGTERM after it): validation top-1 20.2%, the EMA's 24.4% (train loss 2.28
on mixed targets; the learning rate is still warming up: 1.1e-4 of 5.5e-4 at its end; the
tutorial recipe reaches 37.7% then), at 65 training images/s by the console (other work shared the
2 cores at times; 2026-12-01). It learns; whether it reaches the goal needs the GPU run.

Offline smoke run (scikit-learn's digits, ships with the package; 39 s on this project's 2-core
CPU, AMD EPYC with AVX-512, preparing the digits included; measured 95.6% test top-1):

    python launch.py --config=experiments/patch_convnet.py:smoke --workdir=runs/smoke
"""

import ml_collections
from ml_collections import config_dict

from attn_jax.experiment import benchmark_settings

# The arguments get_config accepts: `--config=experiments/patch_convnet.py[:ARG]`.
VARIANTS = (None, "smoke", "modern")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tutorial recipe; `arg="smoke"` gives the small offline run, `arg="modern"` the modern
    recipe."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    # Start a new run from saved weights (fine-tuning): a workdir (its best checkpoint, or its
    # latest when none is rated) or one checkpoint, DIR/checkpoints/STEP; --mode=import makes one
    # from the official PatchConvNet weights. The head starts afresh when the class count differs.
    config.init_from = config_dict.placeholder(str)
    config.dtype = "float32"  # "float32" | "bfloat16" | "auto" (bfloat16 on GPU/TPU)
    # CPU hosts: JAX devices to split the cores into (data parallelism inside the host), "auto"
    # (2 where there are 2+ cores) or a count such as "4" (attn_jax/cpu_devices.py)
    config.cpu_devices = "auto"
    # CPU runs: keep the memory XLA frees after each step for the next one instead of returning it
    # to the kernel, "auto" (on glibc where JAX computes on the CPU), "keep" or "system"
    # (attn_jax/host_memory.py)
    config.host_memory = "auto"
    config.batch_size = 128  # global, over all devices: the examples per optimizer update
    # Gradient accumulation: k > 1 computes each update's gradient in k micro-batches of
    # batch_size / k (a k-th of the activation memory), the same update; 1: off.
    config.accumulate_steps = 1
    config.eval_batch_size = 128
    config.num_epochs = 50
    config.log_every_steps = 100
    config.steps_per_call = 1  # train steps per jitted call (lax.scan): fewer dispatches on GPU/TPU
    # Compile those steps as a loop or unrolled: "auto" unrolls on CPU, where XLA runs a loop body
    # at half speed (PatchConvNet, 8 steps: 61 images/s looped, 150 unrolled, 117 one per call)
    # and loops on GPU/TPU, where unrolling multiplies the compile time by steps_per_call.
    config.unroll_steps = "auto"  # "auto" | "unroll" | "loop"

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "cifar10"
    config.dataset.num_classes = 10  # checked against the dataset's label feature
    config.dataset.data_dir = config_dict.placeholder(str)  # None: tfds' default
    config.dataset.download = True
    config.dataset.train_split = "train[:40000]"
    config.dataset.val_split = "train[40000:]"
    config.dataset.test_split = "test"
    config.dataset.image_key = "image"
    config.dataset.label_key = "label"
    # Training order: a uniform permutation per epoch, a function of (seed, epoch) (data.epoch_order).
    # A split up to this size is decoded once and kept on every device (CIFAR: 120 MB), the
    # batches gathered inside the step; None: a quarter of a device's memory; 0: always stream.
    config.dataset.resident_limit_mib = config_dict.placeholder(int)
    config.dataset.read_workers = config_dict.placeholder(int)  # decoding processes; None: 1/core
    config.dataset.prefetch = 2  # streamed: calls' batches on the devices ahead of the step
    # Repeated augmentation (DeiT's RASampler, 3): each batch holds B / repeats examples, each
    # `repeats` times with its own augmentation, the epoch as long as before; 1: off.
    config.dataset.repeats = 1
    # Images of mixed sizes reach one size on the host, image_size x image_size (None: every image
    # keeps its size, which must be one): "resize" squashes each to it; "inception" takes
    # Inception's random-resized crop of the image at its true size, its area a fraction in
    # crop_scale and its width / height in crop_ratio (DeiT: (0.08, 1), (3/4, 4/3)). Evaluation
    # resizes the shorter side to image_size / eval_crop_fraction and keeps the centre (DeiT: 0.875;
    # 1.0 squashes as "resize" does).
    config.dataset.image_size = config_dict.placeholder(int)
    config.dataset.crop = "resize"
    config.dataset.crop_scale = (0.08, 1.0)
    config.dataset.crop_ratio = (3 / 4, 4 / 3)
    config.dataset.eval_crop_fraction = 1.0

    config.preprocess = ml_collections.ConfigDict()
    config.preprocess.size = 48  # evaluation: rescale, resize 32 -> 48
    config.preprocess.train_resize = 52  # training: resize 32 -> 52, random crop 48, flip
    config.preprocess.crop = 48
    config.preprocess.flip = True
    config.preprocess.rotation = 0.0
    config.preprocess.contrast = 0.0
    config.preprocess.zoom = 0.0
    config.preprocess.normalize = "rescale"  # x / 255
    # The modern stack (DeiT's recipe through timm; off in the tutorial): RandAugment after the steps
    # above (DeiT: 2 ops, magnitude 9, noise 0.5), random erasing after normalising (DeiT: 0.25,
    # area (0.02, 1/3), aspect (0.3, 1/0.3)).
    config.preprocess.randaugment_ops = 0  # 0: off
    config.preprocess.randaugment_magnitude = 9.0  # of 10
    config.preprocess.randaugment_magnitude_std = 0.5
    config.preprocess.erase_prob = 0.0  # 0: off
    config.preprocess.erase_area = (0.02, 1 / 3)
    config.preprocess.erase_aspect = (0.3, 1 / 0.3)

    config.model = ml_collections.ConfigDict()
    config.model.name = "patch_convnet_tutorial"
    # How the model is computed, not what: "reference" (plain Flax layers), "fast" (attn_jax.fast:
    # same parameters and function, faster on CPU) or "auto" (fast on CPU, reference elsewhere).
    config.model.impl = "auto"
    config.model.dim = 256
    config.model.depth = 2
    config.model.se_ratio = 8
    config.model.attention_dropout = 0.2
    config.model.mlp_dropout = 0.2
    # The tutorial's Trunk wraps ONE list of layers `depth` times, so its blocks share their weights:
    # 1,436,426 parameters, the model behind the published 84.59%. False: independent blocks
    # (2,174,986), as the tutorial's prose and the paper describe.
    config.model.tie_trunk = True

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # "adamw" | "lamb" (LAMB: weight_decay_mode "lr_scaled")
    config.optimizer.clip_grad_norm = 0.0  # clip the gradients' global norm to this first; 0: off
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "warmup_cosine"  # linear warm-up from 0, cosine decay to 0
    config.optimizer.warmup_fraction = 0.15
    config.optimizer.weight_decay = 1e-4
    config.optimizer.weight_decay_mode = "per_step"  # tensorflow-addons AdamW, as the tutorial
    config.optimizer.weight_decay_exclude = ()  # the tutorial decays every variable
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-7  # Keras' default

    config.loss = ml_collections.ConfigDict()
    config.loss.label_smoothing = 0.0

    # Mixup / CutMix of each batch with itself reversed (timm's Mixup, mode "batch"); the targets go
    # through the label-smoothed loss above. Off with both alphas 0 (DeiT: 0.8 and 1.0).
    config.mixup = ml_collections.ConfigDict()
    config.mixup.mixup_alpha = 0.0
    config.mixup.cutmix_alpha = 0.0
    config.mixup.switch_prob = 0.5  # CutMix rather than Mixup, when both alphas are on
    config.mixup.prob = 1.0  # the probability that a batch is mixed

    # An exponential moving average of the parameters, evaluated beside them after every epoch
    # (val/ema_top1, ...), saved in the checkpoints, chosen by --mode=eval|attend --params=ema.
    config.ema = ml_collections.ConfigDict()
    config.ema.decay = 0.0  # 0: off (the tutorial); DeiT's code keeps one with 0.99996
    config.ema.warmup = False  # True: min(decay, (1 + step) / (10 + step)), TensorFlow's warm-up

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 0  # 0: at the end of every epoch (always saved there too)
    config.checkpoint.keep = 3  # the last 3, plus the best by validation top-1

    config.benchmark = benchmark_settings()  # --mode=benchmark's timing knobs

    # Attention maps of the first `attention_images` validation images (the same ones every time)
    # after every `attention_every_epochs` epochs, as the tutorial's TrainMonitor(epoch_interval=5):
    # DIR/attention/epoch_005.png and TensorBoard. 0: none.
    config.attention_every_epochs = 5
    config.attention_images = 16

    if arg == "smoke":
        _smoke(config)
    elif arg == "modern":
        _modern(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}: use ':smoke', ':modern' or nothing")
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
    config.dataset.test_split = "test"
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
