"""attn_jax: attention-based image classifiers (PatchConvNet, EANet, ViT) in JAX/Flax."""
