r"""A small member of the paper's PatchConvNet family on CIFAR-10, under the tutorial's recipe.

The data, preprocessing, optimizer and schedule are experiments/patch_convnet.py's (whose config
this file loads): train = `train[:40000]`, val = `train[40000:]`, batch 128, 50 epochs, AdamW
lr 1e-3 / weight decay 1e-4 per step, warm-up 15% + cosine, random crop and flip. Only the model
and the image size change, so the paper's design (4-conv stem -> 2 convs here, depthwise-conv
trunk with squeeze-excite, layer-scale, drop-path, class-attention pooling with an MLP) can be
compared with the tutorial's under one harness.

Our choices, not the paper's: dim 128, depth 8, 2 stem convs on 32x32 images (no upscaling:
resize 36 + random crop 32 in training) -> 8x8 = 64 patches, layer-scale init 1e-6, drop-path
0.05, class-MLP ratio 3 (the paper's), no attention dropout: 587,082 parameters, 0.025 G
multiply-adds of convs and matmuls per image (the tutorial's model: 1,436,426 parameters with its
shared trunk block, 2,174,986 untied, 0.271 G, 144 patches). The size was picked to train on a CPU,
where XLA's depthwise convolution is slow.

    python launch.py --config=experiments/patch_convnet_paper_cifar.py --workdir=runs/paper_cifar

`:smoke`: scikit-learn's digits with the tutorial's :smoke data and batch; dim 64, depth 2, 3 stem
convs -> 4x4 patches, no drop-path, and lr 3e-3 for 40 epochs rather than the tutorial smoke run's
1e-3 for 30, under which the paper's model learns too slowly on the digits. It should reach about
95% test top-1 in a few minutes on a CPU:

    python launch.py --config=experiments/patch_convnet_paper_cifar.py:smoke --workdir=runs/smoke_paper
"""

import ml_collections

from attn_jax.config import base
from attn_jax.experiment import check_variant, sibling_config

# The arguments get_config accepts: `--config=experiments/patch_convnet_paper_cifar.py[:ARG]`.
VARIANTS = (None, "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tutorial's recipe with a paper-family PatchConvNet; `arg="smoke"` for the offline run."""
    check_variant(__file__, arg, VARIANTS)
    config = sibling_config(__file__, "patch_convnet", arg)  # the tutorial's recipe, or its :smoke run
    config.preprocess.size = 32  # native CIFAR size: 2 stride-2 convs -> 8x8 patches
    config.preprocess.train_resize = 36  # training: resize 32 -> 36, random crop 32 (+ flip)
    config.preprocess.crop = 32

    config.model = base().model  # the tutorial's model fields out
    config.model.update(name="patch_convnet", dim=128, depth=8, stem_convs=2, layer_scale_init=1e-6,
                        drop_path_rate=0.05, mlp_ratio=3.0, attention_dropout=0.0)
    if arg == "smoke":  # digits: 3 stem convs -> 4x4 patches; a higher rate, 10 more epochs
        config.model.dim = 64
        config.model.depth = 2
        config.model.stem_convs = 3
        config.model.drop_path_rate = 0.0
        config.optimizer.learning_rate = 3e-3
        config.num_epochs = 40
    return config
