"""`sklearn_digits`: scikit-learn's 1,797 8x8 handwritten digits as a tfds image dataset.

The offline dataset of the `:smoke` experiments: it ships inside scikit-learn, so preparing it needs
no network. Each 8x8 grey image (values 0..16) is scaled to 0..255, upscaled 4x by pixel repetition
to 32x32 and repeated over 3 channels, so it flows through exactly the pipeline CIFAR does. The
split is fixed: a seed-0 permutation puts 360 images in `test` and the other 1,437 in `train`.
Preparing it (tfds encodes the images as PNG) needs TensorFlow; reading it does not.
"""

import numpy as np
import tensorflow_datasets as tfds

_TEST_SIZE = 360
_UPSCALE = 4


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, 32x32 RGB, 10 classes."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Same examples; attn_jax prepares it as ArrayRecord (random access, "
                              "read without TensorFlow) instead of TFRecord."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        order = np.random.default_rng(0).permutation(len(_load_images()[0]))
        return {
            "train": self._generate_examples(order[_TEST_SIZE:]),
            "test": self._generate_examples(order[:_TEST_SIZE]),
        }

    def _generate_examples(self, indices):
        images, labels = _load_images()
        for i in sorted(indices):
            yield int(i), {"image": images[i], "label": int(labels[i])}


def _load_images() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 [1797, 32, 32, 3] images and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(_UPSCALE, axis=1).repeat(_UPSCALE, axis=2)
    return np.repeat(images[..., None], 3, axis=-1), digits.target
