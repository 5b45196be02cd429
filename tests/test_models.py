"""attn_jax/registry.py: a model chosen by name, from the reference or the fast layers; attn_jax/models
imports nothing of attn_jax outside itself."""

import subprocess
import sys

import pytest
from conftest import load_experiment

from attn_jax import fast, registry
from attn_jax.errors import UserError
from attn_jax.models import eanet


def test_unknown_model_is_a_clear_error(tiny_config):
    config = tiny_config(**{"model.name": "resnet"})
    with pytest.raises(UserError, match="unknown model name 'resnet'.*patch_convnet_tutorial"):
        registry.create_model(config, 10)


def test_auto_is_fast_on_cpu_and_reference_elsewhere():
    assert registry.resolve_impl("auto", "cpu") == "fast"
    assert registry.resolve_impl("auto", "gpu") == "reference"
    assert registry.resolve_impl("auto", "tpu") == "reference"
    assert registry.resolve_impl("reference", "cpu") == "reference"
    assert registry.layers_for("reference", "cpu") == {}
    assert registry.layers_for("fast", "gpu")["conv"] is fast.Conv
    config = load_experiment("eanet")
    config.model.impl = "reference"
    assert registry.create_model(config, 100).external_attention is eanet.ExternalAttention
    config.model.impl = "fast"
    assert registry.create_model(config, 100).external_attention is fast.ExternalAttention


def test_a_field_a_model_refuses_is_one_user_error_naming_it(tiny_config):
    config = tiny_config(**{"model.widht": 3})
    with pytest.raises(UserError, match=r"^model 'patch_convnet_tutorial' does not accept these "
                                        r"config\.model fields: .*'widht'"):
        registry.create_model(config, 10)
    config = load_experiment("eanet")
    config.model.num_heads = 3
    with pytest.raises(UserError, match=r"^dim 64 is not divisible by num_heads 3: set config\.model\.dim"):
        registry.create_model(config, 100)


def test_models_import_only_flax_jax_numpy_and_themselves():
    """attn_jax.models stands alone: importing it loads no other attn_jax module, nor
    ml_collections."""
    code = ("import sys, attn_jax.models; print(sorted(m for m in sys.modules if m.startswith("
            "('attn_jax', 'ml_collections')) and not m.startswith('attn_jax.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['attn_jax']"]
