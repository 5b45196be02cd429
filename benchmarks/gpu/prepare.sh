#!/bin/bash
# Prepares what a GPU machine with no network (Python 3.12, JAX and its CUDA plugin installed; no
# TensorFlow, tensorflow-datasets or ml_collections) needs to install attn_jax with its dependencies
# and train on CIFAR-10: wheels in .whl/ and the ArrayRecord CIFAR-10 copy in .gpu_data/, both
# git-ignored, to be carried with the checkout (under the device tool's 64 MiB).
#
#     bash benchmarks/gpu/prepare.sh [../shared/tfds_array_record]
#
# The wheels are attn_jax's requirements (pyproject.toml, no extras) resolved for Python 3.12 with
# the device's JAX (DEVICE_JAX, default 0.11.2: the device tool's KINDS.md), less the packages the
# device image already holds that attn_jax does not bound itself (JAX, NumPy, SciPy, rich, ...:
# DEVICE_HAS below), plus setuptools to build attn_jax there. device_run.sh installs from them: pip keeps each installed package whose
# version lies inside attn_jax's bounds and installs the rest from .whl/ (an installed version
# outside the bounds of a package not carried stops the install, naming it). `promise` has no
# wheel on PyPI: it is built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/tfds_array_record}
device_jax=${DEVICE_JAX:-0.11.2}
# Installed on the device and not bounded by attn_jax itself (its own requirements are carried,
# whatever version the device has): large packages, and the small ones its requirements need
DEVICE_HAS=(jax jaxlib numpy scipy ml-dtypes opt-einsum tensorstore pyarrow matplotlib contourpy
            fonttools kiwisolver pillow scikit-learn joblib threadpoolctl protobuf psutil pyyaml
            msgpack requests urllib3 charset-normalizer idna certifi uvloop pygments rich
            markdown-it-py mdurl narwhals wrapt six typing-extensions attrs fsspec python-dateutil
            pyparsing cycler toolz zipp humanize cloudpickle treescope einops)
py=
for candidate in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
  if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  echo "error: resolving for the device needs a Python 3.12 here; set PYTHON312=/path/to/python3.12" >&2
  exit 2
fi
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 any; do
  platforms+=(--platform "$p")
done
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
rm -rf .whl && mkdir -p .whl
"$py" -m pip wheel -q --no-deps -w .whl promise==2.3
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$py" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  > "$scratch/requirements.txt"
# The versions pip would choose on the device: its JAX pinned, everything else the newest allowed
"$py" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$scratch/report.json" \
  --target "$scratch/unused" "${target[@]}" --find-links .whl -r "$scratch/requirements.txt" \
  "jax==$device_jax" setuptools
"$py" - "$scratch/report.json" "${DEVICE_HAS[@]}" > "$scratch/carry.txt" <<'EOF'
import json, re, sys
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
report, skip = sys.argv[1], {norm(n) for n in sys.argv[2:]} | {"promise"}
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in skip:
        print(f"{meta['name']}=={meta['version']}")
EOF
"$py" -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" -d .whl -r "$scratch/carry.txt"
rm -rf .gpu_data && mkdir -p .gpu_data && cp -r "$data" .gpu_data/tfds_array_record
echo "$(ls .whl | wc -l) wheels for Python 3.12 with JAX $device_jax"
du -sh .whl .gpu_data
