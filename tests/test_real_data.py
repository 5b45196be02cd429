"""A small PatchConvNet learns real CIFAR-10 images (../shared/tfds): a check no mock can give."""

import pytest
from conftest import tiny_patch_convnet_config

from attn_jax import train

# Chance is 10%. This config (fixed seed, 8 fake CPU devices, deterministic on CPU) measured 23.8%
# validation top-1 on the 1,000 held-out images after 3 epochs on 4,000 images; 18% leaves room for
# numerical differences between machines and still fails a pipeline that does not learn (~10%).
THRESHOLD = 0.18


@pytest.mark.slow
def test_small_patch_convnet_learns_cifar10(tmp_path, shared_cifar10):
    config = tiny_patch_convnet_config(**{
        "dataset.data_dir": str(shared_cifar10), "dataset.download": False,
        "dataset.train_split": "train[:4000]", "dataset.val_split": "train[40000:41000]",
        "dataset.test_split": "train[41000:41016]",
        "batch_size": 64, "eval_batch_size": 200, "num_epochs": 3, "log_every_steps": 1000,
        "preprocess.size": 32, "preprocess.train_resize": 36, "preprocess.crop": 32,
        "model.dim": 32, "model.se_ratio": 8, "optimizer.learning_rate": 3e-3,
    })
    final = train.train_and_evaluate(config, str(tmp_path))
    assert final["val/top1"] > THRESHOLD, final
