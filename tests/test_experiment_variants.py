"""Every experiment file with every argument its get_config accepts (its module-level `VARIANTS`):
the train state builds and the train step traces, both as a run builds them and as --mode=benchmark
does (EMA included where the recipe keeps one), abstractly: no parameter is initialised and
nothing is compiled, so S60 at 224 px takes seconds."""

import jax
import pytest
from conftest import ROOT
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import data, train
from attn_jax.bench import steps
from attn_jax.experiment import load_module
from attn_jax.state import has_ema, initial_state

# The full-size ImageNet variants trace a 25M-parameter model at 224 px (seconds each): slow-marked,
# so the quick set keeps the tiny configs.
VARIANTS = [pytest.param(path, arg, id=f"{path.stem}:{arg}",
                         marks=[pytest.mark.slow] if "imagenet" in path.stem and arg != "smoke" else [])
            for path in sorted((ROOT / "experiments").glob("*.py"))
            for arg in load_module(path).VARIANTS]


def shapes(tree) -> list:
    return [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree.leaves_with_path(tree)]


@pytest.mark.parametrize("path, arg", VARIANTS)
def test_every_variant_builds_its_state_and_traces_its_train_and_benchmark_steps(path, arg):
    config = load_module(path).get_config(arg)
    mesh = train.create_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    stats = steps.placeholder_stats(config)
    _, _, state = initial_state(config, mesh, total_steps=100, abstract=True)
    assert has_ema(state) == (config.ema.decay > 0)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding == replicated
               for x in jax.tree.leaves(state))

    # A run's call of one step on a streamed batch of the dataset's image size.
    size = config.dataset.image_size
    image_shape = (size, size, 3) if size else steps.raw_image_shape(config)
    key = jax.random.key(config.seed)
    call = train.jit_train_call(config, mesh, 1, data.StreamedFeed)
    stepped, sums = jax.eval_shape(call, state, train.zero_sums(mesh),
                                   data.batch_spec(config.batch_size, image_shape, mesh, steps=1),
                                   key, stats)
    assert shapes(stepped) == shapes(state) and set(sums) == {"loss", "top1", "top5", "count"}

    # The benchmark's state (the same tree) and its single step on a synthetic batch.
    _, bench_state, bench_key = steps.initial_state(config, mesh, abstract=True)
    assert shapes(bench_state) == shapes(state)
    train_fn = train.jit_train_step(config, mesh)
    batch = data.batch_spec(config.batch_size, steps.raw_image_shape(config), mesh)
    stepped, _ = jax.eval_shape(train_fn, bench_state, batch, bench_key, stats)
    assert shapes(stepped) == shapes(state)
