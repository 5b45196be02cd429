#!/bin/bash
# Trains and benchmarks attn_jax on a GPU machine in one command, run from the checkout's root there
# with .whl/ and .gpu_data/ copied beside it (benchmarks/gpu/prepare.sh makes them):
#
#     bash benchmarks/gpu/device_run.sh            # results under $OUT
#     QUICK=1 bash benchmarks/gpu/device_run.sh    # a rehearsal on CPU: tiny splits, 1 epoch
#
# It first installs attn_jax with its dependencies into the python3 it finds (pip, offline, from
# .whl/), keeping the device's JAX and every other installed package inside attn_jax's bounds. A
# rehearsal on CPU therefore runs in a Python 3.12 virtual environment of its own, first on PATH,
# never in one whose attn_jax is installed from another checkout.
#
# In order, each stage under its own time limit so that a slow one cannot eat the next, and all of
# them within DEADLINE_S seconds (default 560: the device tool stops a command at 600 s; a 10 s margin
# is kept), a stage that would get under 30 s skipped and said so in $OUT/summary.txt:
#   1. the tutorial PatchConvNet, 50 epochs, bfloat16, the experiment's defaults, CIFAR-10 from the
#      ArrayRecord copy (validation and test train[40000:]: there is no test split here);
#   2. --mode=benchmark for the three tutorial models (bfloat16, steps_per_call 1 and 16; float32
#      for PatchConvNet);
#   3. EANet and the ViT baseline, 50 epochs each on CIFAR-10, while time is left.
# Each run's small outputs (run.json, summary.json, metrics.jsonl, curves.png, console log,
# benchmark.json) are copied to $OUT (an empty folder; by default a new one under /tmp);
# workdirs and checkpoints go to a new folder under /tmp, so no earlier run is touched.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d /tmp/attn_jax_out.XXXX)}
mkdir -p "$OUT"
if [ -n "$(ls -A "$OUT")" ]; then
  echo "error: OUT=$OUT already holds files: give an empty or new folder" >&2
  exit 2
fi
runs=$(mktemp -d /tmp/attn_jax_runs.XXXX)
echo "outputs in $OUT, workdirs in $runs"
if ! python3 -m pip install -q --disable-pip-version-check --no-index --find-links .whl \
    --no-compile --no-cache-dir -e . > "$runs/install.log" 2>&1; then
  cp "$runs/install.log" "$OUT/"
  tail -5 "$OUT/install.log" >&2
  echo "error: installing attn_jax from .whl/ failed (whole log: $OUT/install.log)" >&2
  exit 1
fi
{ nvidia-smi -L; python3 -c "from attn_jax import jax_runtime, versions
versions.warn_if_untested()
print(jax_runtime.describe_devices())"; python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax|numpy|grain|tensorflow)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

data=(--config.dataset.data_dir=.gpu_data/tfds_array_record --config.dataset.download=False
      "--config.dataset.test_split=train[40000:]")
epochs=50 limit=${LIMIT_S:-240} bench_limit=${BENCH_LIMIT_S:-90} deadline=${DEADLINE_S:-560} quick_bench=()
if [ "${QUICK:-0}" = 1 ]; then
  quick_bench=(--config.benchmark.steps=1 --config.benchmark.repeats=1)
  data+=("--config.dataset.train_split=train[:512]" "--config.dataset.val_split=train[40000:40256]"
         "--config.dataset.test_split=train[40000:40256]")
  epochs=1 limit=${LIMIT_S:-300} bench_limit=${BENCH_LIMIT_S:-150} deadline=${DEADLINE_S:-1200}
fi

budget() {  # name seconds: prints the stage's time limit (seconds, capped by the deadline less a
            # 10 s margin), or notes the stage as skipped in summary.txt and fails if under 30 s
  local left=$((deadline - SECONDS - 10))
  if [ "$left" -lt 30 ]; then
    echo "$1: skipped, ${left} s (under 30) left before the ${deadline} s deadline and its margin" | tee -a "$OUT/summary.txt" >&2
    return 1
  fi
  echo $(($2 < left ? $2 : left))
}

train() {  # name experiment [overrides...]: one full run, its outputs copied to $OUT/name
  local name=$1 experiment=$2; shift 2
  local dir=$runs/$name start=$SECONDS seconds
  seconds=$(budget "$name" "$limit") || return 0
  timeout -k 10 "$seconds" python3 launch.py --config="$experiment" --workdir="$dir" \
    --config.num_epochs=$epochs "${data[@]}" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s from launch (limit $seconds s)" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/$name"
  cp "$dir"/{run.json,summary.json,metrics.jsonl,curves.png} "$OUT/$name/" 2>/dev/null
  tail -3 "$OUT/$name.log"
}

bench() {  # name experiment [overrides...]: --mode=benchmark, benchmark.json to $OUT/name
  local name=$1 experiment=$2 seconds; shift 2
  seconds=$(budget "bench $name" "$bench_limit") || return 0
  timeout -k 10 "$seconds" python3 launch.py --config="$experiment" --mode=benchmark --workdir="$runs/bench_$name" \
    "${data[@]}" "${quick_bench[@]}" "$@" > "$OUT/bench_$name.log" 2>&1
  echo "bench $name: exit $?" | tee -a "$OUT/summary.txt"
  mkdir -p "$OUT/bench_$name" && cp "$runs/bench_$name/benchmark.json" "$OUT/bench_$name/" 2>/dev/null
  grep -E "^(train|eval) step" "$OUT/bench_$name.log"
}

train patch_convnet experiments/patch_convnet.py --config.dtype=bfloat16
bench patch_convnet_bf16 experiments/patch_convnet.py --config.dtype=bfloat16
bench patch_convnet_bf16_k16 experiments/patch_convnet.py --config.dtype=bfloat16 --config.steps_per_call=16
bench patch_convnet_f32 experiments/patch_convnet.py --config.dtype=float32
bench eanet_bf16 experiments/eanet.py --config.dtype=bfloat16
bench eanet_bf16_k16 experiments/eanet.py --config.dtype=bfloat16 --config.steps_per_call=16
bench vit_bf16 experiments/vit.py --config.dtype=bfloat16
bench vit_bf16_k16 experiments/vit.py --config.dtype=bfloat16 --config.steps_per_call=16
cifar10=(--config.dataset.name=cifar10 --config.dataset.num_classes=10 --config.dtype=bfloat16)
train eanet experiments/eanet.py "${cifar10[@]}"
train vit experiments/vit.py "${cifar10[@]}"
