"""attn_jax/models/__init__.py: a model chosen by name, from the reference or the fast layers."""

import pytest
from conftest import load_experiment

from attn_jax import fast, models
from attn_jax.errors import UserError
from attn_jax.models import eanet


def test_unknown_model_is_a_clear_error(tiny_config):
    config = tiny_config(**{"model.name": "resnet"})
    with pytest.raises(UserError, match="unknown model name 'resnet'.*patch_convnet_tutorial"):
        models.create_model(config, 10)


def test_auto_is_fast_on_cpu_and_reference_elsewhere():
    assert models.resolve_impl("auto", "cpu") == "fast"
    assert models.resolve_impl("auto", "gpu") == "reference"
    assert models.resolve_impl("auto", "tpu") == "reference"
    assert models.resolve_impl("reference", "cpu") == "reference"
    assert models.layers_for("reference", "cpu") == {}
    assert models.layers_for("fast", "gpu")["conv"] is fast.Conv
    config = load_experiment("eanet")
    config.model.impl = "reference"
    assert models.create_model(config, 100).external_attention is eanet.ExternalAttention
    config.model.impl = "fast"
    assert models.create_model(config, 100).external_attention is fast.ExternalAttention
