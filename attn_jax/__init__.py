"""attn_jax: attention-based image classifiers (PatchConvNet, EANet, ViT) in JAX/Flax.

`attn_jax.load(workdir_or_checkpoint)` returns a saved model (trained or imported), its parameters
and config, ready for `model.apply` (`attn_jax.modes.load`).
"""


def load(path, which: str | int = "best", params: str = "raw", config=None):
    """A saved model: see `attn_jax.modes.load` (imported here on first use, to keep
    `import attn_jax` light)."""
    from attn_jax import modes

    return modes.load(path, which, params, config)
