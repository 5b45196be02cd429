"""FLOPs of a step, the numerators of the benchmark's MFU: XLA's count of every op of the step,
counted on the model's reference form, and the model FLOPs (convolutions and matrix products)."""

from collections.abc import Callable

import jax
import ml_collections

from attn_jax import model_stats, registry


def reference_state(state, config: ml_collections.ConfigDict, num_classes: int):
    """`state` applying the reference form of config's model (`impl="reference"`): the same
    parameter tree, so the same state with another `apply_fn`."""
    model = registry.create_model(config, num_classes, impl="reference")
    return state.replace(apply_fn=model.apply)


def xla_flops(step: Callable, compiled, state, *args, config: ml_collections.ConfigDict,
              num_devices: int) -> float:
    """FLOPs of one call of the jitted `step` (a train or eval step, the train state its first
    argument) on `state, *args`, from XLA's cost analysis of the per-device, SPMD-partitioned program
    (so scaled by `num_devices`), every op counted, a multiply-add as 2.

    Counted on the model's reference form: the fast layers compute attention a few examples at a
    time on CPU (`attn_jax.fast.chunking`), a loop whose body XLA counts once, so their step is
    compiled again with the reference layers, which compute the same function in whole-batch ops.
    `compiled` (the step as timed) is counted as it is when the model already is the reference form.
    """
    impl = registry.resolve_impl(config.model.impl, jax.default_backend())
    if impl != "reference":
        reference = reference_state(state, config, config.dataset.num_classes)
        compiled = step.lower(reference, *args).compile()
    return model_stats.cost_flops(compiled) * num_devices


def model_flops(model, image_shape: tuple[int, int, int]) -> float:
    """FLOPs of one image's forward pass of `model` (its reference form: `impl="reference"`; the
    fast EANet's folded memories would count fewer) counting only its convolutions and matrix products, 2 per
    multiply-add (`model_stats.forward_macs`): the usual MFU numerator, 3 forward passes for a train
    step (forward, input and weight gradients) and one for eval; element-wise work is not counted."""
    return 2.0 * model_stats.forward_macs(model, model_stats.abstract_variables(model, image_shape),
                                          image_shape)
