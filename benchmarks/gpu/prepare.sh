#!/bin/bash
# Prepares what a GPU machine without TensorFlow, tensorflow-datasets or ml_collections needs to run
# attn_jax: wheels for Python 3.12 in .whl/ and the ArrayRecord CIFAR-10 copy in .gpu_data/, both
# git-ignored, to be copied with the checkout (together about 55 MiB).
#
#     bash benchmarks/gpu/prepare.sh [../shared/tfds_array_record]
#
# The packages are those attn_jax needs that such a machine's image lacks: tfds and its missing
# requirements, ml_collections, array_record, grain, dm-pix, tensorboardX. `promise` has no wheel
# on PyPI: it is built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/tfds_array_record}
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 any; do
  platforms+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 array_record==0.8.6 grain==0.2.18 dm-pix==0.4.5 \
  tensorboardX==2.6.5 dm-tree==0.1.10 immutabledict simple_parsing docstring-parser \
  tensorflow-metadata googleapis-common-protos termcolor toml importlib_resources portpicker
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
rm -rf .gpu_data && mkdir -p .gpu_data && cp -r "$data" .gpu_data/tfds_array_record
du -sh .whl .gpu_data
