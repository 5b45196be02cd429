"""tfds builders that attn_jax ships: importing this package registers them with tfds."""

from attn_jax.datasets import sklearn_digits  # noqa: F401  (registers "sklearn_digits")
