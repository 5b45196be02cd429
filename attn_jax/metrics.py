"""The metrics of the train and eval steps (`train`): the metric sums of a batch, which the steps
add up on the devices, and their means, fetched to the host once per log interval or evaluation.

Sums rather than means, so that padded examples (mask False) count for nothing and batches of any
size add up exactly; `means` divides by the count at the end.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Metrics = dict[str, jax.Array]


def metric_sums(logits: jax.Array, labels: jax.Array, losses: jax.Array,
                mask: jax.Array) -> Metrics:
    """Sums over the real (mask=True) examples: loss, top-1 and top-5 hits, and their count."""
    mask = mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top5 = jax.lax.top_k(logits, k)[1]
    return {
        "loss": jnp.sum(losses * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def attention_entropy(attention: jax.Array) -> jax.Array:
    """Entropy in nats of each attention map: [B, N] -> [B]; log(N) for a uniform map, 0 for one
    patch."""
    attention = attention.astype(jnp.float32)
    return -jnp.sum(attention * jnp.log(jnp.clip(attention, 1e-12)), axis=-1)


def means(sums: Metrics) -> dict[str, float]:
    """Metric sums (fetched to the host) -> means; accuracies are fractions in [0, 1]."""
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    return {k: float(v) / count for k, v in sums.items() if k != "count"}


def zero_sums(mesh: Mesh) -> Metrics:
    """Empty training-metric accumulators, replicated over `mesh`."""
    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}
    return jax.device_put(zeros, NamedSharding(mesh, PartitionSpec()))
