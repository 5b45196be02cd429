"""attn_jax/convert_dataset.py: a dataset prepared as TFRecord copied, record for record, to ArrayRecord."""

import json

import numpy as np
from conftest import in_process_digits_config

from attn_jax import convert_dataset, data


def test_convert_dataset_copies_every_record(tmp_path, digits_data_dir, digits_tfrecord_dir):
    assert convert_dataset.main(["--name=sklearn_digits", f"--data_dir={digits_tfrecord_dir}",
                                 f"--out_dir={tmp_path}"]) == 0
    info = json.loads(next(tmp_path.glob("sklearn_digits/*/dataset_info.json")).read_text())
    assert info["fileFormat"] == "array_record"
    for split in ("train", "test"):
        converted = data.load_split(in_process_digits_config(tmp_path).dataset, split)
        reference = data.load_split(in_process_digits_config(digits_data_dir).dataset, split)
        assert not isinstance(converted.examples, data.Arrays)  # read by random access
        indices = np.arange(reference.num_examples)
        for a, b in zip(converted.examples.read(indices), reference.examples.read(indices),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    # Converting again into a prepared copy is refused, with one line.
    assert convert_dataset.main(["--name=sklearn_digits", f"--data_dir={digits_tfrecord_dir}",
                                 f"--out_dir={tmp_path}"]) == 2
