"""The peak FLOP/s the benchmark's MFU is measured against: a table of accelerators' dense peaks,
and on CPU the FLOP/s of a large square matmul timed in the process."""

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device, by the start of `jax.Device.device_kind`, most specific first.
# float32 on GPU counts TF32 tensor cores (JAX's default matmul precision there); on TPU float32
# matmuls run as bfloat16 passes at the default precision, so both dtypes share the bfloat16 peak.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H100 NVL": {"bfloat16": 835e12, "float32": 418e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "NVIDIA H200 NVL": {"bfloat16": 835e12, "float32": 418e12},  # the PCIe card
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 495e12},  # SXM: the H100's compute, more memory
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e
}


def table_peak(device: jax.Device, dtype: str) -> float | None:
    """`PEAK_FLOPS` for `device` in `dtype`, or None for a device the table does not know."""
    for kind, peaks in PEAK_FLOPS.items():
        if device.device_kind.startswith(kind):
            return peaks.get(dtype)
    return None


def matmul_peak(dtype: str, sizes=(2048, 4096), repeats: int = 5, device=None) -> dict:
    """FLOP/s of a square `jnp.dot` on `device` (default: the first local one), the best size's
    median over `repeats` runs: {"flops_per_s", "size", "by_size"}."""
    by_size = {n: median_of(matmul_probe(dtype, n, device), repeats) for n in sizes}
    best = max(by_size, key=by_size.get)
    return {"flops_per_s": by_size[best], "size": best,
            "by_size": {str(n): v for n, v in by_size.items()}}


def matmul_probe(dtype: str, size: int, device=None) -> Callable[[], float]:
    """A compiled square matmul of `size` on `device`: calling it times one product, in FLOP/s."""
    device = jax.local_devices()[0] if device is None else device
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), dtype), device)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(dot(a, b))

    def probe() -> float:
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        return 2 * size ** 3 / (time.perf_counter() - start)

    return probe


def median_of(probe: Callable[[], float], repeats: int) -> float:
    """The median of `repeats` calls of `probe`."""
    return statistics.median(probe() for _ in range(repeats))


def device_peak(dtype: str, mesh, opts: dict) -> tuple[dict, Callable[[], float] | None]:
    """The peak MFU is measured against, as (description, probe): on CPU a matmul of the best of
    `opts["matmul_sizes"]`, re-timed by `probe()` (median of `matmul_repeats` products) beside each
    step timing; elsewhere the `PEAK_FLOPS` table times the devices (probe None if it does not
    know the device)."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        sizes = matmul_peak(dtype, opts["matmul_sizes"], opts["matmul_repeats"], device)
        product = matmul_probe(dtype, sizes["size"], device)
        info = {"source": f"measured: {dtype} {sizes['size']}^2 matmul beside each timing",
                "by_size": sizes["by_size"]}
        return info, lambda: median_of(product, opts["matmul_repeats"])
    per_device = table_peak(device, dtype)
    info = {"source": f"table: {device.device_kind} {dtype} x {mesh.devices.size}"}
    if per_device is None:
        return info, None
    return info, lambda: per_device * mesh.devices.size
