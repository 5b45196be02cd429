"""The modes of `launch.py` other than training, each one function of the config."""

import ml_collections

from attn_jax import summary, train


def summarize(config: ml_collections.ConfigDict) -> None:
    """--mode=summary: the parameter table per module, forward FLOPs per image and the total."""
    num_classes = config.dataset.num_classes
    model = train.create_model(config, num_classes)
    size = config.preprocess.size
    print(f"model: {config.model.name} ({num_classes} classes)")
    print(summary.format_summary(model, (size, size, 3)))
