"""Which parameters get weight decay: a boolean mask for `optax.adamw(..., mask=...)`."""

from collections.abc import Sequence

import jax


def decay_mask(params, exclude: Sequence[str], *, exclude_vectors: bool = False):
    """A pytree of bools shaped like `params`: False for every leaf whose path has a component
    named in `exclude` (a module or parameter name, e.g. ("cls_token", "layer_scale")), True
    otherwise.

    With `exclude_vectors=True`, leaves with fewer than 2 dimensions (biases, LayerNorm scales and
    offsets, layer-scales) are excluded too, as timm's `create_optimizer` does for the official
    DeiT / CaiT / PatchConvNet training (it adds the model's `no_weight_decay()` names to them).
    Works on arrays and `jax.ShapeDtypeStruct`s alike.
    """
    excluded = set(exclude)

    def keep(path, leaf) -> bool:
        names = {str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path}
        if names & excluded:
            return False
        return not (exclude_vectors and len(leaf.shape) < 2)

    return jax.tree_util.tree_map_with_path(keep, params)
