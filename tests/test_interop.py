"""The official PatchConvNet weights (attn_jax.interop): the .pth format without PyTorch, the key
table against the official names, import / export / load / init_from, and the imported network's
forward pass against an independent NumPy forward of the official layer order.

`tests/data/torch_*.pth` were written by PyTorch 2.14.1 (`torch.save`), so the reader is checked
against PyTorch's own writer without PyTorch installed:

    sd = OrderedDict(a=w.t(), b=torch.tensor([1, 2, 3]), c=w[1:3, 2:5],
                     d=torch.ones(3, dtype=torch.bfloat16), e=torch.tensor(3.5),
                     f=torch.zeros(2, dtype=torch.float16))   # w = arange(24.).reshape(4, 6)
    torch.save(sd, "torch_state_dict.pth")
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 3,
                "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}, "torch_checkpoint.pth")
"""

import argparse
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import digits_config, load_experiment, with_overrides
from scipy.special import erf

import attn_jax
from attn_jax import modes, train
from attn_jax.errors import UserError
from attn_jax.interop import patch_convnet as official
from attn_jax.interop import pth
from attn_jax.models import patch_convnet as pc
from attn_jax.registry import create_model
from attn_jax.state import initial_state
from attn_jax.warm_start import warm_start

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# The .pth format
# ---------------------------------------------------------------------------------------------
def test_reads_what_pytorch_wrote():
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    got = pth.read_state_dict(DATA / "torch_state_dict.pth")
    assert list(got) == ["a", "b", "c", "d", "e", "f"]
    np.testing.assert_array_equal(got["a"], w.T)  # a transposed view: strides honoured
    np.testing.assert_array_equal(got["c"], w[1:3, 2:5])  # an offset into a shared storage
    assert got["b"].dtype == np.int64 and got["d"].dtype == ml_dtypes.bfloat16
    assert got["e"].shape == () and got["e"] == 3.5 and got["f"].dtype == np.float16
    wrapped = pth.read_state_dict(DATA / "torch_checkpoint.pth")  # {"model": ..., "args": ...}
    assert list(wrapped) == list(got)
    args = pth.read(DATA / "torch_checkpoint.pth")["args"]
    assert isinstance(args, pth.Opaque) and args.state == {"lr": 1e-3}


def test_write_then_read_is_exact_and_aligned_as_torch_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32),
               "h": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
               "n": np.array([7, -1], np.int64), "m": np.array([True, False]),
               "s": np.array(2.5, np.float64)}
    path = tmp_path / "x.pth"
    pth.write_state_dict(path, tensors)
    got = pth.read_state_dict(path)
    assert list(got) == list(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert got[name].tobytes() == array.tobytes()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            data_start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            assert data_start % 64 == 0, info.filename


class _Boom:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def _zip_with_pickle(path: Path, obj) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))


def test_reading_runs_no_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _zip_with_pickle(tmp_path / "evil.pth", {"model": {}, "payload": _Boom(),
                                             "args": argparse.Namespace(lr=1)})
    obj = pth.read(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    assert isinstance(obj["payload"], pth.Opaque) and obj["payload"].name == "posix.system"


def _crafted_tensor_file(path: Path, size, stride, offset=0) -> None:
    """A .pth whose one tensor claims `size`, `stride` and `offset` over a 1-element storage."""
    storage = pth._tuple([pth._string("storage"), pth._global("torch", "FloatStorage"),
                          pth._string("0"), pth._string("cpu"), pth._int(1)]) + b"Q"
    args = pth._tuple([storage, pth._int(offset), pth._tuple([pth._int(n) for n in size]),
                       pth._tuple([pth._int(n) for n in stride]), b"\x89", pth._EMPTY_ORDERED_DICT])
    pickled = (b"\x80\x02" + pth._EMPTY_ORDERED_DICT + b"(" + pth._string("x")
               + pth._global("torch._utils", "_rebuild_tensor_v2") + args + b"Ru.")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/data/0", np.float32(1).tobytes())


@pytest.mark.parametrize("size, stride, offset", [((256,), (1,), 0), ((2,), (-1,), 0),
                                                  ((1,), (1,), 1)])
def test_a_tensor_cannot_read_past_its_storage(tmp_path, size, stride, offset):
    _crafted_tensor_file(tmp_path / "x.pth", size, stride, offset)
    with pytest.raises(UserError, match="not a readable .pth file"):
        pth.read_state_dict(tmp_path / "x.pth")
    _crafted_tensor_file(tmp_path / "ok.pth", (1,), (1,))
    assert pth.read_state_dict(tmp_path / "ok.pth")["x"] == 1.0


def test_a_file_cannot_alter_the_reader(tmp_path):
    """BUILD on a name the file resolves changes only this read's own wrapper of it."""
    pickled = (b"\x80\x02" + pth._global("torch._utils", "_rebuild_tensor_v2") + b"N}"
               + pth._string("__defaults__") + b"(J\x07\x00\x00\x00ts\x86b.")
    with zipfile.ZipFile(tmp_path / "x.pth", "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
    pth.read(tmp_path / "x.pth")
    assert pth._rebuild_tensor.__defaults__ is None
    assert list(pth.read_state_dict(DATA / "torch_state_dict.pth")) == ["a", "b", "c", "d", "e", "f"]


def test_files_that_are_not_a_state_dict_are_clear_errors(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="not a zip-format .pth file: a truncated download"):
        pth.read_state_dict(legacy)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((DATA / "torch_state_dict.pth").read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        pth.read_state_dict(truncated)
    _zip_with_pickle(tmp_path / "odd.pth", {"lr": 0.1})
    with pytest.raises(UserError, match="not a state_dict.*'lr'"):
        pth.read_state_dict(tmp_path / "odd.pth")
    with pytest.raises(UserError, match="no such file"):
        pth.read_state_dict(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# The key table, against the official names and shapes (facebookresearch/deit patchconvnet_models.py)
# ---------------------------------------------------------------------------------------------
def _shapes(model, size):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))["params"]


def official_shapes(params) -> dict[str, tuple]:
    return {k: v.shape for k, v in official.to_state_dict(
        jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)).items()}


def test_s60_maps_to_the_official_keys_and_shapes():
    shapes = official_shapes(_shapes(pc.S60(num_classes=1000, drop_path_rate=0.0,
                                            attention_dropout=0.0), 224))
    assert len(shapes) == 807
    assert list(shapes)[:3] == ["cls_token", "patch_embed.proj.0.0.weight",
                                "patch_embed.proj.2.0.weight"]
    expected = {  # as the official modules create them for S60 (d = 384)
        "cls_token": (1, 1, 384),
        "patch_embed.proj.0.0.weight": (48, 3, 3, 3), "patch_embed.proj.6.0.weight": (384, 192, 3, 3),
        "blocks.0.gamma_1": (384,), "blocks.0.norm1.weight": (384,),
        "blocks.0.attn.qkv_pos.0.weight": (384, 384, 1, 1), "blocks.0.attn.qkv_pos.0.bias": (384,),
        "blocks.0.attn.qkv_pos.2.weight": (384, 1, 3, 3),
        "blocks.59.attn.qkv_pos.4.conv_reduce.weight": (96, 384, 1, 1),
        "blocks.59.attn.qkv_pos.4.conv_expand.bias": (384,),
        "blocks.59.attn.qkv_pos.5.weight": (384, 384, 1, 1),
        "blocks_token_only.0.gamma_2": (384,), "blocks_token_only.0.attn.q.weight": (384, 384),
        "blocks_token_only.0.attn.k.bias": (384,), "blocks_token_only.0.attn.proj.weight": (384, 384),
        "blocks_token_only.0.norm2.bias": (384,), "blocks_token_only.0.mlp.fc1.weight": (1152, 384),
        "blocks_token_only.0.mlp.fc2.weight": (384, 1152), "norm.weight": (384,),
        "head.weight": (1000, 384), "head.bias": (1000,)}
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert list(shapes)[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    block = [k.removeprefix("blocks.7.") for k in shapes if k.startswith("blocks.7.")]
    assert block == ["gamma_1", "norm1.weight", "norm1.bias"] + [  # parameters, then modules
        f"attn.qkv_pos.{m}.{p}" for m in ("0", "2", "4.conv_reduce", "4.conv_expand", "5")
        for p in ("weight", "bias")]
    token = [k.removeprefix("blocks_token_only.0.") for k in shapes if "token_only" in k]
    assert token == ["gamma_1", "gamma_2"] + [f"{m}.{p}" for m in (
        "norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")]


def test_the_tutorial_model_is_refused():
    config = load_experiment("patch_convnet")
    params = _shapes(create_model(config, 10, impl="reference"), 48)
    with pytest.raises(UserError, match="paper's PatchConvNet only"):
        official.table_for(params)


# ---------------------------------------------------------------------------------------------
# The imported network against a NumPy forward of the official layer order (float64)
# ---------------------------------------------------------------------------------------------
def random_state_dict(params, seed=0) -> dict[str, np.ndarray]:
    """Official-layout tensors for `params`' model: weights ~ N(0, 1 / fan_in), norms around 1,
    biases, layer-scales and the class token random, so that every tensor matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in official_shapes(params).items():
        if key.endswith("weight") and len(shape) > 1:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "norm" in key and key.endswith("weight"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.5 * rng.standard_normal(shape)
        out[key] = value.astype(np.float32)
    return out


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _layer_norm(x, sd, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _conv(x, weight, bias=None, stride=1, depthwise=False):
    """PyTorch Conv2d, padding k // 2: x [B, C, H, W], weight [O, C (or 1), k, k]."""
    k = weight.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = 0
    for i in range(k):
        for j in range(k):
            tap = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out = out + (tap * weight[None, :, 0, i, j, None, None] if depthwise
                         else np.einsum("bchw,oc->bohw", tap, weight[:, :, i, j]))
    return out if bias is None else out + bias[None, :, None, None]


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def official_forward(sd, images_nchw, stem_convs, depth):
    """The official PatchConvnet.forward, written out: -> (logits, class attention over patches)."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = images_nchw.astype(np.float64)
    for j in range(stem_convs):
        x = _conv(_gelu(x) if j else x, sd[f"patch_embed.proj.{2 * j}.0.weight"], stride=2)
    batch, dim, h, w = x.shape
    tokens = x.reshape(batch, dim, h * w).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
    for i in range(depth):
        b, q = f"blocks.{i}", f"blocks.{i}.attn.qkv_pos"
        y = _layer_norm(tokens, sd, f"{b}.norm1").transpose(0, 2, 1).reshape(batch, dim, h, w)
        y = _gelu(_conv(y, sd[f"{q}.0.weight"], sd[f"{q}.0.bias"]))
        y = _gelu(_conv(y, sd[f"{q}.2.weight"], sd[f"{q}.2.bias"], depthwise=True))
        s = y.mean((2, 3), keepdims=True)
        s = np.maximum(_conv(s, sd[f"{q}.4.conv_reduce.weight"], sd[f"{q}.4.conv_reduce.bias"]), 0)
        s = _conv(s, sd[f"{q}.4.conv_expand.weight"], sd[f"{q}.4.conv_expand.bias"])
        y = _conv(y / (1 + np.exp(-s)), sd[f"{q}.5.weight"], sd[f"{q}.5.bias"])
        tokens = tokens + sd[f"{b}.gamma_1"] * y.reshape(batch, dim, h * w).transpose(0, 2, 1)
    t = "blocks_token_only.0"
    cls = np.broadcast_to(sd["cls_token"], (batch, 1, dim))
    u = _layer_norm(np.concatenate([cls, tokens], 1), sd, f"{t}.norm1")
    query = _linear(u[:, :1], sd, f"{t}.attn.q") * dim ** -0.5  # one head
    scores = query @ _linear(u, sd, f"{t}.attn.k").transpose(0, 2, 1)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    cls = cls + sd[f"{t}.gamma_1"] * _linear(attn @ _linear(u, sd, f"{t}.attn.v"), sd,
                                              f"{t}.attn.proj")
    mlp = _linear(_gelu(_linear(_layer_norm(cls, sd, f"{t}.norm2"), sd, f"{t}.mlp.fc1")), sd,
                  f"{t}.mlp.fc2")
    cls = cls + sd[f"{t}.gamma_2"] * mlp
    features = _layer_norm(np.concatenate([cls, tokens], 1), sd, "norm")[:, 0]
    on_patches = attn[:, 0, 1:]
    return _linear(features, sd, "head"), on_patches / on_patches.sum(-1, keepdims=True)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_imported_forward_matches_the_official_layer_order(impl):
    config = load_experiment("patch_convnet_s60_imagenet", "smoke")
    config.model.update(dim=32, depth=2, stem_convs=4)  # the official 4-conv stem, d/8 .. d
    model = create_model(config, 10, impl=impl)
    sd = random_state_dict(_shapes(model, 64))
    params = official.to_params(sd, _shapes(model, 64))
    images = np.random.default_rng(1).standard_normal((3, 64, 64, 3)).astype(np.float32)
    logits, attention = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
        params, images)
    want_logits, want_attention = official_forward(sd, images.transpose(0, 3, 1, 2), 4, 2)
    assert np.abs(want_logits).max() > 1  # a forward that does something
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(attention, want_attention, atol=1e-6)


def test_no_position_embedding_so_any_image_size_works():
    model = pc.S60(num_classes=10, drop_path_rate=0.0, attention_dropout=0.0, dim=32, depth=1,
                   stem_convs=2)
    sd = random_state_dict(_shapes(model, 32))
    apply = jax.jit(model.apply, static_argnames="train")
    for size in (32, 48):  # 16 and 36 patches: the same parameters
        params = official.to_params(sd, _shapes(model, size))
        images = np.zeros((1, size, size, 3), np.float32)
        logits, attention = apply({"params": params}, images, train=False)
        assert logits.shape == (1, 10) and attention.shape == (1, (size // 4) ** 2)
        want, _ = official_forward(sd, images.transpose(0, 3, 1, 2), 2, 1)
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# --mode=import, --mode=export, attn_jax.load, config.init_from
# ---------------------------------------------------------------------------------------------
def smoke_config(num_classes=10):
    """The S60 experiment's :smoke model (dim 32, depth 2, 2 stem convs, 32 px) for `num_classes`."""
    config = load_experiment("patch_convnet_s60_imagenet", "smoke")
    return with_overrides(config, {"dataset.num_classes": num_classes})


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny official state_dict with a 1000-class head, and its import into a workdir."""
    tmp = tmp_path_factory.mktemp("imported")
    config = smoke_config(1000)
    sd = random_state_dict(_shapes(create_model(config, 1000), 32))
    pth.write_state_dict(tmp / "official.pth", sd)
    path = modes.import_weights(config, tmp / "run", tmp / "official.pth")
    return tmp, sd, path


def test_import_then_export_is_bitwise(imported, tmp_path):
    tmp, sd, path = imported
    assert path == tmp / "run" / "checkpoints" / "0"
    exported = modes.export_weights(smoke_config(1000), tmp / "run", tmp_path / "back.pth")
    back = pth.read_state_dict(exported)
    assert list(back) == list(sd)
    assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)
    assert exported.read_bytes() == (tmp / "official.pth").read_bytes()  # even the file
    with pytest.raises(UserError, match="exists"):  # never overwritten
        modes.export_weights(smoke_config(1000), tmp / "run", exported)
    run_json = json.loads((tmp / "run" / "run.json").read_text())
    assert run_json["config"]["dataset.num_classes"] == 1000


def test_load_gives_a_ready_model_for_imported_weights(imported):
    tmp, sd, _ = imported
    loaded = attn_jax.load(tmp / "run")  # the config from DIR/run.json
    assert loaded.step == 0 and loaded.config.model.name == "patch_convnet"
    images = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits, _ = loaded.model.apply({"params": loaded.params}, images, train=False)
    want, _ = official_forward(sd, images.transpose(0, 3, 1, 2), 2, 2)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
    assert attn_jax.load(tmp / "run" / "checkpoints" / "0").step == 0


@pytest.mark.parametrize("damage", ["rename", "reshape", "drop", "head"])
def test_a_state_dict_that_does_not_fit_is_one_error_and_writes_nothing(imported, tmp_path, damage):
    _, sd, _ = imported
    sd = dict(sd)
    num_classes = 1000
    if damage == "rename":
        sd["blocks.1.attn.qkv_pos.0.weights"] = sd.pop("blocks.1.attn.qkv_pos.0.weight")
        expected = "'blocks.1.attn.qkv_pos.0.weights', which the config's model lacks"
    elif damage == "reshape":
        sd["blocks.0.attn.qkv_pos.2.weight"] = sd["blocks.0.attn.qkv_pos.2.weight"][:, :, :2]
        expected = r"'blocks.0.attn.qkv_pos.2.weight' has shape \(32, 1, 2, 3\).*\(32, 1, 3, 3\)"
    elif damage == "drop":
        del sd["blocks_token_only.0.gamma_2"]
        expected = "it lacks 'blocks_token_only.0.gamma_2'"
    else:
        num_classes = 10  # the file's head has 1000 classes
        expected = r"'head.weight' has shape \(1000, 32\)"
    pth.write_state_dict(tmp_path / "bad.pth", sd)
    with pytest.raises(UserError, match=expected):
        modes.import_weights(smoke_config(num_classes), tmp_path / "run", tmp_path / "bad.pth")
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_workdir_with_checkpoints(imported, tmp_path):
    tmp, sd, _ = imported
    pth.write_state_dict(tmp_path / "other.pth", sd)  # the same weights, from another file
    with pytest.raises(UserError, match="already holds a run"):
        modes.import_weights(smoke_config(1000), tmp / "run", tmp_path / "other.pth")


def test_an_import_stopped_before_it_was_recorded_is_redone_by_the_same_command(
        imported, tmp_path, monkeypatch):
    """Killed after its checkpoint was committed but before DIR/run.json, its last write, or while
    orbax wrote the checkpoint (an uncommitted one left): the same import into the same workdir
    is done afresh; once finished, the same import finds it so and another is refused."""
    tmp, sd, _ = imported
    workdir, weights = tmp_path / "run", tmp / "official.pth"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(modes.run_record, "check_and_record", killed)
        modes.import_weights(smoke_config(1000), workdir, weights)
    assert (workdir / "checkpoints" / "0").is_dir() and not (workdir / "run.json").exists()
    (workdir / "checkpoints" / "1.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    path = modes.import_weights(smoke_config(1000), workdir, weights)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]
    back = pth.read_state_dict(modes.export_weights(smoke_config(1000), workdir,
                                                    tmp_path / "back.pth"))
    assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)
    assert modes.import_weights(smoke_config(1000), workdir, weights) == path  # finished: kept
    with pytest.raises(UserError, match="already holds a run"):  # another file, or config
        modes.import_weights(smoke_config(1000), workdir, tmp_path / "back.pth")
    with pytest.raises(UserError, match="already holds a run"):
        modes.import_weights(smoke_config(10), workdir, weights)


def test_init_from_keeps_every_parameter_but_a_new_head(imported):
    """Fine-tuning: 1000 classes -> 10, and 32 -> 48 px (the patch grid grows, nothing else)."""
    tmp, sd, _ = imported
    config = with_overrides(smoke_config(10), {"preprocess.size": 48, "ema.decay": 0.99})
    mesh = train.create_mesh()
    _, _, fresh = initial_state(config, mesh, total_steps=10)
    state, note = warm_start(fresh, str(tmp / "run"))
    assert "head starts afresh" in note and "['head']['kernel']" in note
    loaded = official.to_state_dict(jax.device_get(state.params) | {"head": jax.device_get(
        {"kernel": np.zeros((32, 1000), np.float32), "bias": np.zeros(1000, np.float32)})})
    for key in sd:
        if not key.startswith("head."):
            assert loaded[key].tobytes() == sd[key].tobytes(), key
    np.testing.assert_array_equal(state.params["head"]["kernel"], fresh.params["head"]["kernel"])
    assert state.params["head"]["kernel"].shape == (32, 10)
    np.testing.assert_array_equal(state.ema_params["stem"]["Conv_0"]["kernel"],
                                  state.params["stem"]["Conv_0"]["kernel"])
    assert int(state.step) == 0


def test_init_from_another_model_is_one_error(imported):
    tmp, _, _ = imported
    config = with_overrides(smoke_config(10), {"model.depth": 3})
    _, _, fresh = initial_state(config, train.create_mesh(), total_steps=10)
    with pytest.raises(UserError, match=r"\['block_2'\].* is missing there"):
        warm_start(fresh, str(tmp / "run"))
    with pytest.raises(UserError, match="neither a workdir with checkpoints nor a checkpoint"):
        warm_start(fresh, str(tmp / "nowhere"))


@pytest.mark.slow
def test_eval_restores_an_imported_checkpoint(digits_data_dir, tmp_path):
    """--mode=eval's default --checkpoint=best finds the import, which has no validation score."""
    config = digits_config(digits_data_dir, {"dataset.read_workers": 0},
                           experiment="patch_convnet_s60_imagenet")
    pth.write_state_dict(tmp_path / "w.pth", random_state_dict(_shapes(create_model(config, 10), 32)))
    modes.import_weights(config, tmp_path / "run", tmp_path / "w.pth")
    metrics = modes.evaluate_checkpoint(config, tmp_path / "run")
    assert metrics["step"] == 0 and 0.0 <= metrics["test/top1"] <= 1.0
    assert (tmp_path / "run" / "eval_best_test.json").exists()


@pytest.mark.slow
def test_fine_tune_from_imported_weights_end_to_end(imported, digits_data_dir, tmp_path, capsys):
    """A digits run (10 classes, 48 px) with config.init_from trains from the imported weights
    (1000 classes, 32 px), and a relaunch resumes from its own checkpoint, not from them."""
    tmp, _, _ = imported
    config = digits_config(digits_data_dir, {
        "dataset.read_workers": 0, "num_epochs": 1, "init_from": str(tmp / "run"),
        "dataset.train_split": "train[:192]", "preprocess.size": 48, "preprocess.train_resize": 48},
        experiment="patch_convnet_s60_imagenet")
    result = train.train_and_evaluate(config, str(tmp_path / "fine"))
    assert np.isfinite(result["test/loss"])
    assert f"initialised from the checkpoint at step 0 in {tmp / 'run'}" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "fine" / "run.json").read_text())["config"]
    assert recorded["init_from"] == str(tmp / "run")


def test_state_dict_pickle_is_what_torch_expects():
    """The writer's opcodes unpickle (with stand-ins for torch's names) into the structure
    torch.load rebuilds: an OrderedDict of _rebuild_tensor_v2(storage, 0, size, stride, False,
    OrderedDict()) with persistent ids ('storage', FloatStorage, key, 'cpu', numel)."""
    calls = []

    class Global(tuple):  # a name the pickle refers to; called, it records its arguments
        def __call__(self, *args):
            calls.append((self, args))
            return self

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            return Global((module, name))

        def persistent_load(self, pid):
            calls.append(("persistent", pid))
            return "storage"

    result = Recorder(io.BytesIO(pth._pickle({"a.weight": np.ones((2, 3), np.float32)}))).load()
    assert list(result) == ["a.weight"]
    assert calls == [("persistent", ("storage", ("torch", "FloatStorage"), "0", "cpu", 6)),
                     (("torch._utils", "_rebuild_tensor_v2"), ("storage", 0, (2, 3), (3, 1), False, {}))]
