"""Property tests: damaged or mutated SAE folders give a jsae error or a correct load, never anything else.

A mutated cfg.json (keys dropped, values of the wrong type, odd values) and corrupted or truncated
safetensors / npz files must raise a `jsae.JsaeError` subclass or load an SAE whose fields have
their declared types and whose tensors have the declared shapes and dtype.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jsae
from jsae import io

D_IN, D_SAE = 4, 8
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

CONFIGS = {
    "standard": jsae.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE),
    "topk": jsae.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=True),
    "jumprelu": jsae.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="bfloat16"),
    "transcoder": jsae.TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=6),
}
# A pre-6.0 config (no sae_lens_version): the loader upgrades it.
LEGACY = {
    "model_name": "gpt2-small",
    "hook_point": "blocks.8.hook_resid_pre",
    "hook_point_layer": 8,
    "hook_point_head_index": None,
    "d_in": D_IN,
    "d_sae": D_SAE,
    "dtype": "torch.float32",
    "device": "mps",
    "context_size": 128,
    "normalize_activations": False,
    "activation_fn_kwargs": {},
    "prepend_bos": True,
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)
odd_values = st.sampled_from(
    ["false", "true", "0", "", "8", -1, 0, 1, 3, 4.0, 8, 2**31, 2**64, 1e308, float("inf"), float("nan"),
     "float16", "torch.float16", "bfloat16", "int8", "none", "layer_norm", "hook_z", "topk", "standard",
     "transcoder", "jumprelu", "5.0.0", "6.54.12", "not a version", [], {}, None, True, False]
)
values = odd_values | json_values
field_names = sorted(
    {f.name for cfg in CONFIGS.values() for f in dataclasses.fields(cfg)}
    | {"architecture", "hook_point", "activation_fn", "activation_fn_kwargs", "sae_lens_version", "unknown"}
)
metadata_names = sorted(io.METADATA_KEYS | {"sae_lens_version", "jsae_execution"})
mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(field_names), st.none()),
    st.tuples(st.just("set"), st.sampled_from(field_names), values),
    st.tuples(st.just("meta"), st.sampled_from(metadata_names), values),
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, cfg in CONFIGS.items():
        sae = jsae.SAE.from_config(cfg, seed=1).replace(sparsity=np.linspace(-3, 0, D_SAE, dtype=np.float32))
        sae.save_model(root / name)
        out[name] = root / name
    np.savez(
        root / "gemma.npz",
        w_enc=np.ones((D_IN, D_SAE), np.float32),
        w_dec=np.ones((D_SAE, D_IN), np.float32),
        b_enc=np.zeros(D_SAE, np.float32),
        b_dec=np.zeros(D_IN, np.float32),
        threshold=np.full(D_SAE, 0.1, np.float32),
    )
    out["gemma"] = root / "gemma.npz"
    return out


def fresh_copy(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def assert_loads_correctly_or_jsae_error(path):
    """Load `path`; a non-jsae exception fails the test, a load must give a well-formed SAE."""
    try:
        sae = jsae.SAE.load_from_disk(path)
    except jsae.JsaeError:
        return None
    cfg = sae.cfg
    kinds = {"bool": bool, "int": int, "str": str}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        kind = kinds.get(field.type) if isinstance(field.type, str) else None
        if kind is not None:
            assert type(value) is kind, f"{field.name}={value!r} loaded, but the field is {field.type}"
    for name, shape in io.expected_shapes(cfg).items():
        assert sae.params[name].shape == shape
        assert sae.params[name].dtype == cfg.jnp_dtype
    if sae.sparsity is not None:
        assert sae.sparsity.shape == (cfg.d_sae,)
    return sae


def apply(cfg: dict, mutations) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for op, key, value in mutations:
        if op == "drop":
            cfg.pop(key, None)
        elif op == "set":
            cfg[key] = value
        else:
            if not isinstance(cfg.get("metadata"), dict):
                cfg["metadata"] = {}
            cfg["metadata"][key] = value
    return cfg


@FUZZ
@given(base=st.sampled_from([*CONFIGS, "legacy"]), mutations=st.lists(mutation, min_size=1, max_size=3))
@example(base="topk", mutations=[("set", "rescale_acts_by_decoder_norm", "false")])
@example(base="topk", mutations=[("set", "d_sae", 2**64)])
@example(base="legacy", mutations=[("set", "metadata", "gpt2")])
@example(base="legacy", mutations=[("set", "activation_fn_kwargs", [3])])
def test_mutated_cfg_json(folders, tmp_path, base, mutations):
    folder = fresh_copy(folders["standard" if base == "legacy" else base], tmp_path / "sae")
    original = LEGACY if base == "legacy" else json.loads((folder / "cfg.json").read_text())
    cfg = apply(original, mutations)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = assert_loads_correctly_or_jsae_error(folder)
    if sae is None or io.is_legacy_config(cfg):
        return
    # A current-format config loads exactly the values it holds.
    for field in dataclasses.fields(sae.cfg):
        if field.name in cfg and field.name not in ("metadata", "dtype", "device", "normalize_activations"):
            assert getattr(sae.cfg, field.name) == cfg[field.name]


@FUZZ
@given(data=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_cfg_json_bytes(folders, tmp_path, data):
    folder = fresh_copy(folders["standard"], tmp_path / "sae")
    (folder / "cfg.json").write_bytes(data)
    assert_loads_correctly_or_jsae_error(folder)


def corruptions(size: int):
    """Truncations, byte overwrites (biased to the header) and insertions of a file of `size` bytes."""
    header = min(size - 1, 200)
    position = st.integers(0, header) | st.integers(0, size - 1)
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, size - 1), st.just(b"")),
        st.tuples(st.just("overwrite"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
    )


def corrupt(data: bytes, op: str, at: int, new: bytes) -> bytes:
    if op == "truncate":
        return data[:at]
    if op == "overwrite":
        return data[:at] + new + data[at + len(new) :]
    return data[:at] + new + data[at:]


@FUZZ
@given(
    base=st.sampled_from(list(CONFIGS)),
    filename=st.sampled_from([io.WEIGHTS_FILENAME, io.SPARSITY_FILENAME]),
    damage=st.data(),
)
def test_corrupted_safetensors(folders, tmp_path, base, filename, damage):
    folder = fresh_copy(folders[base], tmp_path / "sae")
    data = (folder / filename).read_bytes()
    for op, at, new in damage.draw(st.lists(corruptions(len(data)), min_size=1, max_size=3)):
        data = corrupt(data, op, at, new) if data else data
    (folder / filename).write_bytes(data)
    sae = assert_loads_correctly_or_jsae_error(folder)
    if sae is not None:
        assert sae.cfg == CONFIGS[base].replace(metadata=sae.cfg.metadata)


@FUZZ
@given(damage=st.data())
def test_corrupted_params_npz(folders, tmp_path, damage):
    data = folders["gemma"].read_bytes()
    for op, at, new in damage.draw(st.lists(corruptions(len(data)), min_size=1, max_size=3)):
        data = corrupt(data, op, at, new) if data else data
    folder = tmp_path / "gemma"
    folder.mkdir(exist_ok=True)
    (folder / io.GEMMA_SCOPE_FILENAME).write_bytes(data)
    sae = assert_loads_correctly_or_jsae_error(folder)
    if sae is not None:
        assert sae.architecture == "jumprelu" and (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
