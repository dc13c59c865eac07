"""Bad input gets a jsae error naming the file or field, what was expected and what was found."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import jsae
from jsae import io


@pytest.fixture
def folder(tmp_path):
    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=8, d_sae=32), seed=0)
    sae.save_model(tmp_path / "sae")
    return tmp_path / "sae"


def edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn):
    weights = io.read_safetensors(folder / "sae_weights.safetensors")
    save_file(fn(weights), str(folder / "sae_weights.safetensors"))


def test_missing_cfg_json(folder):
    (folder / "cfg.json").unlink()
    with pytest.raises(jsae.MissingFileError, match=r"cfg\.json: file not found"):
        jsae.SAE.load_from_disk(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(jsae.MissingFileError, match="no such SAE folder"):
        jsae.SAE.load_from_disk(tmp_path / "nope")


def test_missing_weights_file(folder):
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(jsae.MissingFileError, match=r"sae_weights\.safetensors: file not found"):
        jsae.SAE.load_from_disk(folder)


def test_truncated_safetensors(folder):
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(jsae.FormatError, match=r"sae_weights\.safetensors: not a readable safetensors file"):
        jsae.SAE.load_from_disk(folder)


def test_corrupt_safetensors(folder):
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(jsae.FormatError, match="truncated or corrupt"):
        jsae.SAE.load_from_disk(folder)


def test_corrupt_cfg_json(folder):
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(jsae.FormatError, match=r"cfg\.json: not valid JSON"):
        jsae.SAE.load_from_disk(folder)


def test_missing_tensor(folder):
    edit_weights(folder, lambda w: {k: v for k, v in w.items() if k != "b_enc"})
    with pytest.raises(jsae.FormatError, match=r"missing tensor\(s\) \['b_enc'\].*needs"):
        jsae.SAE.load_from_disk(folder)


def test_extra_unknown_tensor(folder):
    edit_weights(folder, lambda w: w | {"b_encc": np.zeros(32, np.float32)})
    with pytest.raises(jsae.FormatError, match=r"unknown tensor\(s\) \['b_encc'\].*Did you mean 'b_enc'"):
        jsae.SAE.load_from_disk(folder)


def test_shape_contradicts_config(folder):
    edit_cfg(folder, d_sae=16)
    with pytest.raises(jsae.FormatError, match=r"'W_dec' has shape \(32, 8\).*d_sae=16.*\(16, 8\)"):
        jsae.SAE.load_from_disk(folder)


def test_missing_d_in(folder):
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["d_in"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(jsae.FormatError, match="missing required field 'd_in'"):
        jsae.SAE.load_from_disk(folder)


def test_unknown_architecture(folder):
    edit_cfg(folder, architecture="topkk")
    with pytest.raises(jsae.ConfigError, match=r"unknown architecture 'topkk'.*Did you mean 'topk'"):
        jsae.SAE.load_from_disk(folder)


def test_unknown_dtype(folder):
    edit_cfg(folder, dtype="float33")
    with pytest.raises(jsae.ConfigError, match=r"dtype: expected one of .*got 'float33'"):
        jsae.SAE.load_from_disk(folder)


def test_unknown_dtype_argument(folder):
    with pytest.raises(jsae.ConfigError, match="dtype argument"):
        jsae.SAE.load_from_disk(folder, dtype="int8")


def test_unknown_normalisation_mode(folder):
    edit_cfg(folder, normalize_activations="layernorm")
    with pytest.raises(jsae.ConfigError, match=r"normalize_activations.*'layernorm'.*Did you mean 'layer_norm'"):
        jsae.SAE.load_from_disk(folder)


def test_d_in_mismatch_at_encode(folder):
    sae = jsae.SAE.load_from_disk(folder)
    with pytest.raises(jsae.InputError, match=r"d_in = 8, got shape \(3, 9\)"):
        sae.encode(np.zeros((3, 9), np.float32))
    with pytest.raises(jsae.InputError, match=r"d_sae = 32, got shape \(3, 8\)"):
        sae.decode(np.zeros((3, 8), np.float32))


def test_non_finite_input_when_checking(folder):
    sae = jsae.SAE.load_from_disk(folder)
    x = np.ones((4, 8), np.float32)
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    sae.encode(x)  # not checked by default (no host sync)
    checked = sae.replace()
    checked.check_finite = True
    with pytest.raises(jsae.InputError, match=r"2 non-finite value\(s\)"):
        checked.encode(x)
    with pytest.raises(jsae.InputError, match="non-finite"):
        checked(x)


def test_unwritable_output_folder(folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    sae = jsae.SAE.load_from_disk(folder)
    with pytest.raises(jsae.JsaeError, match=r"cannot write SAE folder .*a_file is a file"):
        sae.save_model(blocker / "out")
    with pytest.raises(jsae.JsaeError, match="a file with that name exists"):
        sae.save_model(blocker)


def test_invalid_config_values():
    with pytest.raises(jsae.ConfigError, match=r"TopKSAEConfig\.k must be an integer in \[1, d_sae=16\], got 17"):
        jsae.TopKSAEConfig(d_in=4, d_sae=16, k=17)
    with pytest.raises(jsae.ConfigError, match=r"StandardSAEConfig\.d_in must be a positive integer, got -3"):
        jsae.StandardSAEConfig(d_in=-3, d_sae=16)
    with pytest.raises(jsae.ConfigError, match="apply_b_dec_to_input must be false"):
        jsae.TranscoderConfig(d_in=4, d_sae=16, d_out=5, apply_b_dec_to_input=True)


def test_layer_norm_decode_without_state_in_pure_module():
    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=8, d_sae=16, normalize_activations="layer_norm"))
    with pytest.raises(jsae.InputError, match="needs the input statistics"):
        sae.module.apply({"params": sae.params}, np.zeros((2, 16), np.float32), method="decode")


def test_save_never_leaves_half_written_folder(folder, tmp_path, monkeypatch):
    sae = jsae.SAE.load_from_disk(folder)
    calls = []

    def failing_write(path, tensors):
        calls.append(path)
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        sae.save_model(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        sae.save_model(folder)  # an existing folder keeps its old, complete contents
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert calls and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_into_existing_folder_keeps_other_files(folder):
    (folder / "runner_cfg.json").write_text("{}")
    sae = jsae.SAE.load_from_disk(folder)
    sae.replace(params=sae.fold_W_dec_norm().params).save_model(folder)
    assert (folder / "runner_cfg.json").read_text() == "{}"
    assert sorted(os.listdir(folder)) == ["cfg.json", "runner_cfg.json", "sae_weights.safetensors"]


# --------------------------------------------------------------------------- cfg.json field types
@pytest.fixture
def topk_folder(tmp_path):
    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=8, d_sae=32, k=4), seed=0)
    sae.save_model(tmp_path / "topk")
    return tmp_path / "topk"


def test_boolean_field_given_as_string_is_refused(topk_folder):
    # "false" is a non-empty string: taken as a flag it would read as true.
    edit_cfg(topk_folder, rescale_acts_by_decoder_norm="false")
    with pytest.raises(
        jsae.ConfigError,
        match=r"cfg\.json: field 'rescale_acts_by_decoder_norm' must be a JSON boolean \(true or false\), "
        r"found the string 'false'",
    ):
        jsae.SAE.load_from_disk(topk_folder)


@pytest.mark.parametrize(
    "field, value, expected, found",
    [
        ("apply_b_dec_to_input", 1, "JSON boolean", "the integer 1"),
        ("k", 4.0, "JSON integer", "the number 4.0"),
        ("k", True, "JSON integer", "the boolean true"),
        ("d_sae", "32", "JSON integer", "the string '32'"),
        ("device", 5, "JSON string", "the integer 5"),
        ("dtype", ["float32"], "JSON string", "an array"),
        ("normalize_activations", {"mode": "none"}, "JSON string", "an object"),
        ("reshape_activations", None, "JSON string", "null"),
    ],
)
def test_every_field_is_type_checked(topk_folder, field, value, expected, found):
    edit_cfg(topk_folder, **{field: value})
    with pytest.raises(jsae.ConfigError, match=rf"cfg\.json: field '{field}' must be a {expected}.*found {found}"):
        jsae.SAE.load_from_disk(topk_folder)


def test_architecture_given_as_a_list(folder):
    edit_cfg(folder, architecture=["standard"])
    with pytest.raises(jsae.ConfigError, match=r"cfg\.json: field 'architecture' must be a JSON string.*an array"):
        jsae.SAE.load_from_disk(folder)


@pytest.mark.parametrize("value, found", [("gpt2", "the string 'gpt2'"), ([1, 2], "an array"), (3, "the integer 3")])
def test_metadata_not_an_object(folder, value, found):
    edit_cfg(folder, metadata=value)
    with pytest.raises(jsae.ConfigError, match=rf"cfg\.json: field 'metadata' must be a JSON object.*found {found}"):
        jsae.SAE.load_from_disk(folder)


def test_metadata_hook_name_must_be_a_string(folder):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = 8
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(jsae.ConfigError, match=r"field 'metadata\.hook_name' must be a JSON string or null"):
        jsae.SAE.load_from_disk(folder)


def test_cfg_json_not_utf8(folder):
    (folder / "cfg.json").write_bytes(b'{"d_in": 8, "model_name": "caf\xe9"}')
    with pytest.raises(jsae.FormatError, match=r"cfg\.json: not UTF-8 text .*byte 0xe9 at offset 30"):
        jsae.SAE.load_from_disk(folder)


def test_cfg_json_nested_too_deeply(folder):
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(jsae.FormatError, match=r"cfg\.json: JSON nested too deeply"):
        jsae.SAE.load_from_disk(folder)


# --------------------------------------------------------------------------- tensor dtypes
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_or_bool_weights_are_refused(folder, dtype):
    edit_weights(folder, lambda w: w | {"W_enc": w["W_enc"].astype(dtype)})
    with pytest.raises(jsae.FormatError, match=rf"tensor 'W_enc' has dtype {np.dtype(dtype).name}; expected floats"):
        jsae.SAE.load_from_disk(folder)


def test_integer_params_refused_at_construction():
    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=4, d_sae=8))
    with pytest.raises(jsae.FormatError, match=r"params: tensor 'b_enc' has dtype int32; expected floats"):
        jsae.SAE(sae.cfg, sae.params | {"b_enc": np.zeros(8, np.int32)})


def test_integer_sparsity_is_refused(folder):
    save_file({"sparsity": np.zeros(32, np.int32)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(jsae.FormatError, match=r"sparsity\.safetensors: tensor 'sparsity' has dtype int32"):
        jsae.SAE.load_from_disk(folder)


def test_overflow_in_dtype_conversion_is_refused(folder):
    edit_weights(folder, lambda w: w | {"b_dec": np.full(8, 1e6, np.float32)})
    with pytest.raises(jsae.FormatError, match=r"tensor 'b_dec': 8 finite value\(s\) become inf/NaN in float16"):
        jsae.SAE.load_from_disk(folder, dtype="float16")
    edit_cfg(folder, dtype="float16")
    with pytest.raises(jsae.FormatError, match=r"tensor 'b_dec'.*become inf/NaN in float16"):
        jsae.SAE.load_from_disk(folder)


def test_in_range_dtype_conversion_still_loads(folder):
    sae = jsae.SAE.load_from_disk(folder, dtype="float16")
    assert sae.W_enc.dtype == np.float16


def test_one_dimensional_matrix_is_named(folder):
    edit_weights(folder, lambda w: w | {"W_dec": w["W_dec"].ravel()})
    with pytest.raises(jsae.FormatError, match=r"'W_dec' is 1-D with shape \(256,\); expected a 2-D .* \(32, 8\)"):
        jsae.SAE.load_from_disk(folder)


# --------------------------------------------------------------------------- Gemma Scope params.npz
def test_garbage_params_npz(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"garbage" * 20)
    with pytest.raises(jsae.FormatError, match=r"params\.npz: not a NumPy \.npz archive .*w_enc, w_dec"):
        jsae.SAE.load_from_disk(tmp_path)


def test_truncated_params_npz(tmp_path):
    arrays = {"w_enc": np.zeros((8, 4), np.float32), "w_dec": np.zeros((4, 8), np.float32)}
    np.savez(tmp_path / "params.npz", **arrays)
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(jsae.FormatError, match=r"params\.npz: not a readable \.npz archive, truncated or corrupt"):
        jsae.SAE.load_from_disk(tmp_path)


def test_npy_saved_as_params_npz(tmp_path):
    with open(tmp_path / "params.npz", "wb") as f:
        np.save(f, np.zeros((8, 4), np.float32))
    with pytest.raises(jsae.FormatError, match=r"params\.npz: a single \.npy array, not an \.npz archive"):
        jsae.SAE.load_from_disk(tmp_path)


def test_one_dimensional_w_enc_in_params_npz(tmp_path):
    np.savez(tmp_path / "params.npz", w_enc=np.zeros(8, np.float32))
    with pytest.raises(jsae.FormatError, match=r"params\.npz: array 'w_enc' has shape \(8,\); expected a 2-D"):
        jsae.SAE.load_from_disk(tmp_path)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_input_is_refused(folder, dtype):
    sae = jsae.SAE.load_from_disk(folder)
    x = np.ones((2, 8), dtype)
    with pytest.raises(jsae.InputError, match=rf"input: dtype {np.dtype(dtype).name}.*real"):
        sae.encode(x)
    with pytest.raises(jsae.InputError, match="complex"):
        sae(x)
    with pytest.raises(jsae.InputError, match="complex"):
        sae.decode(np.ones((2, 32), dtype))


@pytest.mark.parametrize("field", ["d_in", "d_sae"])
def test_width_beyond_int32_indexing(topk_folder, field):
    edit_cfg(topk_folder, **{field: 2**64})
    with pytest.raises(jsae.ConfigError, match=rf"cfg\.json: TopKSAEConfig\.{field} must be at most 2147483647"):
        jsae.SAE.load_from_disk(topk_folder)
