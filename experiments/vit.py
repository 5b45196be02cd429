r"""The EANet tutorial's ViT baseline on CIFAR-100: experiments/eanet.py with self-attention.

The same network, data, augmentation and recipe as experiments/eanet.py (whose config this file
loads), with Keras `MultiHeadAttention(num_heads=4, key_dim=64, dropout=0.2)` in place of external
attention: config.model.attention = "self" is the only difference. 623,268 trainable parameters.

Full run (50 epochs, batch 128, AdamW 1e-3 / wd 1e-4 at a constant learning rate):

    python launch.py --config=experiments/vit.py --workdir=runs/vit

Published: the tutorial claims about 41% test top-1 and 73% top-5 on CIFAR-100 (no run shown).
Measured on this project's 2-core CPU (2026-11-22, before the CPU speed-ups of
docs/performance.md): 3.6 training images/s (a 20-step run on CIFAR-10), so one epoch would have
taken about 3 hours before its evaluation; the train-step benchmark after the speed-ups ran at 11.1
images/s (docs/performance.md). The validation top-1 after one epoch was not measured here.
Forward cost 0.86 GFLOPs per image against EANet's 0.19 (XLA count): self-attention over 256
tokens. A full run is a GPU job.

Modern recipe (`:modern`): EANet's (experiments/eanet.py, where each value's source is given),
on CIFAR-10, with self-attention:

    python launch.py --config=experiments/vit.py:modern --workdir=runs/vit_modern

Measured here, epoch 1 of the 50-epoch schedule on `../shared/tfds_array_record`, stopped with
SIGTERM after it (2026-12-01): validation top-1 21.5%, the EMA's 24.8% (train loss 2.27 on mixed
targets), at 23 training images/s by the console: an epoch takes 30 minutes here.

Offline smoke run (scikit-learn's digits; 2m44s on the project's 2 CPU cores, 2026-11-22, before
the CPU speed-ups; measured 96.1% test top-1):

    python launch.py --config=experiments/vit.py:smoke --workdir=runs/vit_smoke
"""

import ml_collections

from attn_jax.experiment import sibling_config

# The arguments get_config accepts: `--config=experiments/vit.py[:ARG]`.
VARIANTS = (None, "smoke", "modern")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """EANet's config (tutorial recipe, `arg="smoke"` or `arg="modern"`) with self-attention."""
    config = sibling_config(__file__, "eanet", arg)
    config.model.attention = "self"  # 4 heads of key dim = dim; ignores dim_coefficient, memory_slots
    # Exact (erf) GELU, as EANet's: the TensorFlow 2 tutorial's tf.nn.gelu, in the same MLP for both
    # models; True would be the Keras 3 text's ops.gelu (tanh approximation).
    config.model.gelu_approximate = False
    return config
