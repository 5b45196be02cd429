r"""The EANet tutorial's ViT baseline on CIFAR-100: experiments/eanet.py with self-attention.

The same network, data, augmentation and recipe as experiments/eanet.py (whose config this file
loads), with Keras `MultiHeadAttention(num_heads=4, key_dim=64, dropout=0.2)` in place of external
attention: config.model.attention = "self" is the only difference. 623,268 trainable parameters,
0.86 forward GFLOPs per image against EANet's 0.19 (XLA's count, `--mode=summary`): self-attention
over 256 tokens.

    python launch.py --config=experiments/vit.py --workdir=runs/vit

Published: the tutorial claims about 41% test top-1 and 73% top-5 on CIFAR-100 (no run shown).

`:modern`: EANet's modern recipe (experiments/eanet.py, where each value's source is given), on
CIFAR-10, with self-attention:

    python launch.py --config=experiments/vit.py:modern --workdir=runs/vit_modern

`:smoke`: EANet's small offline run on scikit-learn's digits, with self-attention; it should reach
about 96% test top-1:

    python launch.py --config=experiments/vit.py:smoke --workdir=runs/vit_smoke
"""

import ml_collections

from attn_jax.experiment import check_variant, sibling_config

# The arguments get_config accepts: `--config=experiments/vit.py[:ARG]`.
VARIANTS = (None, "smoke", "modern")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """EANet's config (tutorial recipe, `arg="smoke"` or `arg="modern"`) with self-attention."""
    check_variant(__file__, arg, VARIANTS)
    config = sibling_config(__file__, "eanet", arg)
    config.model.attention = "self"  # 4 heads of key dim = dim; ignores dim_coefficient, memory_slots
    # Exact (erf) GELU, as EANet's: the TensorFlow 2 tutorial's tf.nn.gelu, in the same MLP for both
    # models; True would be the Keras 3 text's ops.gelu (tanh approximation).
    config.model.gelu_approximate = False
    return config
