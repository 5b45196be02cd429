r"""attn_jax against the Keras tutorials' own code, on the same machine, in alternating rounds.

    python benchmarks/compare_keras.py --model=eanet --keras_python=/tmp/kerasenv/bin/python

Each round runs the Keras anchor (`--anchor`, by default `../shared/anchors/keras_tutorials.py`: the
tutorial's model in Keras 3, `model.fit` on synthetic CIFAR-sized batches of 128) and then attn_jax's
`--mode=benchmark` train step on the same model, batch and dtype (float32), each in a fresh process,
and records the ratio of their training images/s. The anchor asks for `jit_compile=True`, but Keras
compiles with XLA only where every layer allows it: its in-model augmentation layers do not, so it
warns "Proceeding with `jit_compile=False`" and trains with TensorFlow's own (oneDNN) CPU kernels.
Each round records which (`keras_xla`). A shared machine's speed drifts by tens of
percent within minutes, so only ratios of neighbouring measurements are compared: the median ratio
over the rounds is the figure. Prints one line per round and a summary, and writes the rounds to
`--out` as JSON if given.

The Keras side needs its own virtualenv (not a dependency of attn_jax):

    python -m venv /tmp/kerasenv && /tmp/kerasenv/bin/pip install keras tensorflow-cpu
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"patch_convnet": "experiments/patch_convnet.py", "eanet": "experiments/eanet.py",
               "vit": "experiments/vit.py"}


def keras_images_per_s(python: str, anchor: Path, model: str, steps: int) -> tuple[float, bool]:
    """(training images/s the anchor prints for `model` over `steps` batches after its warm-up,
    whether Keras compiled its step with XLA)."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONWARNINGS": "default"}  # Keras' fallback from XLA is a warning
    done = subprocess.run([python, str(anchor), model, str(steps)], env=env, capture_output=True,
                          text=True, check=True)
    xla = "jit_compile=False" not in done.stderr
    return float(re.search(r"img_per_s=([\d.]+)", done.stdout).group(1)), xla


def attn_jax_images_per_s(model: str, repeats: int, steps: int) -> dict:
    """The train step part of `launch.py --mode=benchmark` (no eval, no input pipeline)."""
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run(
            [sys.executable, "launch.py", f"--config={EXPERIMENTS[model]}", "--mode=benchmark",
             f"--workdir={workdir}", "--config.dtype=float32", "--config.batch_size=128",
             "--config.benchmark.eval=False", "--config.benchmark.pipeline=False",
             f"--config.benchmark.repeats={repeats}", f"--config.benchmark.steps={steps}"],
            cwd=ROOT, capture_output=True, text=True, check=True)
        report = json.loads((Path(workdir) / "benchmark.json").read_text())
    return {**report["train"], "num_devices": report["num_devices"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EXPERIMENTS), required=True)
    parser.add_argument("--keras_python", required=True, help="python of a venv with keras, tensorflow")
    parser.add_argument("--anchor", type=Path,
                        default=ROOT.parent / "shared" / "anchors" / "keras_tutorials.py")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keras_steps", type=int, default=20, help="timed Keras batches per round")
    parser.add_argument("--repeats", type=int, default=5, help="attn_jax timings per round")
    parser.add_argument("--steps", type=int, default=3, help="attn_jax steps per timing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.anchor.is_file():
        sys.exit(f"error: no Keras anchor at {args.anchor}: pass --anchor=PATH/keras_tutorials.py")

    rounds = []
    for r in range(args.rounds):
        keras, keras_xla = keras_images_per_s(args.keras_python, args.anchor, args.model,
                                              args.keras_steps)
        ours = attn_jax_images_per_s(args.model, args.repeats, args.steps)
        rounds.append({"keras_images_per_s": keras, "attn_jax_images_per_s": ours["images_per_s"],
                       "ratio": ours["images_per_s"] / keras, "keras_xla": keras_xla,
                       "attn_jax_devices": ours["num_devices"], "attn_jax_mfu": ours["mfu"],
                       "load_average": os.getloadavg()[0]})
        print(f"round {r + 1}: Keras {keras:.1f} images/s ({'XLA' if keras_xla else 'no XLA'}), "
              f"attn_jax {ours['images_per_s']:.1f} images/s ({ours['num_devices']} devices): "
              f"{rounds[-1]['ratio']:.2f}x", flush=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    print(f"{args.model}: attn_jax / Keras training images/s, median over {len(rounds)} rounds: "
          f"{ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rounds": rounds, "ratio": ratio},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
