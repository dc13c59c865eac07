"""The files bench/probes.py's probes read: the tiny run config, token data files with problems, SAE folders
and their mutations (cfg.json fields, safetensors bytes, a Gemma Scope params.npz)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from probe_table import TINY

VOCAB, CONTEXT = 4096, 32  # the embedded model's vocabulary; TINY's context_size

SAVE_SAES = """
import sys, numpy as np, jsae
root = sys.argv[1]
jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed=0).save_model(root + "/small")
meta = jsae.Metadata(hook_name="blocks.0.hook_resid_pre", model_name="embedded", context_size=32)
jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=256, k=8, metadata=meta), seed=0).save_model(root + "/eval_sae")
"""


def make_assets(assets: Path) -> None:
    """Write what every probe shares (once per work folder)."""
    if (assets / "done").exists():
        return
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    (assets / "empty_dir").mkdir(exist_ok=True)
    np.save(assets / "valid.npy", _valid_rows())
    subprocess.run([sys.executable, "-c", SAVE_SAES, str(assets)], check=True, env=dict(os.environ,
                   JAX_PLATFORMS="cpu"))
    (assets / "done").write_text("")


def _valid_rows(n: int = 200) -> np.ndarray:
    return np.random.default_rng(0).integers(1, VOCAB, size=(n, CONTEXT), dtype=np.int64)


def write_tokens(path: Path) -> None:
    """A dataset file named after its problem (bench/probe_table.py's TOKEN_VARIANTS)."""
    rows, name = _valid_rows(), path.name
    arrays = {
        "negative.npy": lambda: np.where(np.arange(rows.size).reshape(rows.shape) == 77, -5, rows),
        "float.npy": lambda: rows.astype(np.float64) + 0.5,
        "integral_float.npy": lambda: rows.astype(np.float32),
        "oov.npy": lambda: np.where(np.arange(rows.size).reshape(rows.shape) == 77, 99999, rows),
        "empty.npy": lambda: np.zeros((0, CONTEXT), np.int64),
        "one_d.npy": lambda: rows.ravel(),
        "three_d.npy": lambda: rows.reshape(100, 2, CONTEXT),
        "short_rows.npy": lambda: rows[:, :8],
        "bool.npy": lambda: rows > 2000,
        "valid.npy": lambda: rows,
    }
    if name in arrays:
        np.save(path, arrays[name]())
    elif name == "truncated.npy":
        np.save(path, rows)
        path.write_bytes(path.read_bytes()[:300])
    elif name == "object.npy":
        np.save(path, np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    elif name == "garbage.txt":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 60_000, dtype=np.uint8).tobytes())
    else:
        path.write_text({
            "empty.txt": "", "whitespace.txt": "  \n\t\n \n",
            "bad.jsonl": '{"text": "def f(): pass"}\n{not json\n',
            "no_text.jsonl": "\n".join(json.dumps({"foo": "def f(): pass"}) for _ in range(50)),
            "ids_oov.jsonl": "\n".join(json.dumps({"tokens": [3] * 31 + [99999]}) for _ in range(100)),
            "no_text.csv": "a,b\n1,2\n3,4\n",
        }[name])


def _cfg(folder: Path, change) -> None:
    path = folder / "cfg.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _tensors(folder: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "sae_weights.safetensors"
    data = load_file(str(path))
    change(data)
    save_file(data, str(path))


def _header(folder: Path, change) -> None:
    """Rewrite the safetensors JSON header in place (the data bytes stay)."""
    path = folder / "sae_weights.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _raw(name: str, transform):
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_bytes(transform(path.read_bytes()))
    return apply


def _npz(folder: Path, damage) -> None:
    (folder / "cfg.json").unlink()
    (folder / "sae_weights.safetensors").unlink()
    d_in, d_sae = 16, 32
    arrays = {"w_enc": np.ones((d_in, d_sae), np.float32), "w_dec": np.ones((d_sae, d_in), np.float32),
              "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32),
              "threshold": np.full(d_sae, 0.1, np.float32)}
    if damage == "missing_key":
        del arrays["threshold"]
    np.savez(folder / "params.npz", **arrays)
    raw = (folder / "params.npz").read_bytes()
    if damage == "truncated":
        (folder / "params.npz").write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        (folder / "params.npz").write_bytes(raw[:40] + b"\x00garbage" * 50 + raw[440:])


def _folder_is_a_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def _weights_dir(folder: Path) -> None:
    (folder / "sae_weights.safetensors").unlink()
    (folder / "sae_weights.safetensors").mkdir()


MUTATIONS = {
    "cfg:d_in_string": lambda f: _cfg(f, _set("d_in", "16")),
    "cfg:d_sae_zero": lambda f: _cfg(f, _set("d_sae", 0)),
    "cfg:k_zero": lambda f: _cfg(f, _set("k", 0)),
    "cfg:k_above_d_sae": lambda f: _cfg(f, _set("k", 64)),
    "cfg:k_float": lambda f: _cfg(f, _set("k", 4.5)),
    "cfg:architecture_bogus": lambda f: _cfg(f, _set("architecture", "bogus")),
    "cfg:dtype_bogus": lambda f: _cfg(f, _set("dtype", "float33")),
    "cfg:missing_d_in": lambda f: _cfg(f, lambda d: d.pop("d_in")),
    "cfg:empty": _raw("cfg.json", lambda b: b""),
    "cfg:a_list": _raw("cfg.json", lambda b: b"[1, 2]"),
    "cfg:not_utf8": _raw("cfg.json", lambda b: b'{"d_in": "\xe9"}'),
    "cfg:d_in_bool": lambda f: _cfg(f, _set("d_in", True)),
    "cfg:d_sae_huge": lambda f: _cfg(f, _set("d_sae", 10**12)),
    "cfg:normalize_bogus": lambda f: _cfg(f, _set("normalize_activations", "bogus")),
    "cfg:metadata_list": lambda f: _cfg(f, _set("metadata", [])),
    "cfg:extra_field": lambda f: _cfg(f, _set("zzz_unknown", 1)),
    "cfg:nan_scaling": lambda f: _cfg(f, _set("d_in", float("nan"))),
    "cfg:d_in_negative": lambda f: _cfg(f, _set("d_in", -16)),
    "cfg:missing": lambda f: (f / "cfg.json").unlink(),
    "w:truncated": _raw("sae_weights.safetensors", lambda b: b[: len(b) // 2]),
    "w:header_garbage": _raw("sae_weights.safetensors", lambda b: b[:8] + b"\xff" * 40 + b[48:]),
    "w:header_huge": _raw("sae_weights.safetensors", lambda b: struct.pack("<Q", 1 << 60) + b[8:]),
    "w:empty": _raw("sae_weights.safetensors", lambda b: b""),
    "w:nan": lambda f: _tensors(f, lambda d: d["W_enc"].__setitem__((0, 0), np.nan)),
    "w:inf": lambda f: _tensors(f, lambda d: d["b_dec"].__setitem__(0, np.inf)),
    "w:shape": lambda f: _tensors(f, lambda d: d.__setitem__("W_dec", np.ascontiguousarray(d["W_dec"].T))),
    "w:extra_tensor": lambda f: _tensors(f, lambda d: d.__setitem__("W_enc_x", np.ones(3, np.float32))),
    "w:missing_tensor": lambda f: _tensors(f, lambda d: d.pop("b_enc")),
    "w:int_dtype": lambda f: _tensors(f, lambda d: d.__setitem__("W_enc", d["W_enc"].astype(np.int32))),
    "w:float16": lambda f: _tensors(f, lambda d: d.update({k: v.astype(np.float16) for k, v in d.items()})),
    "w:is_a_dir": _weights_dir,
    "w:missing": lambda f: (f / "sae_weights.safetensors").unlink(),
    "w:offsets_overlap": lambda f: _header(f, lambda h: h["W_enc"].__setitem__("data_offsets", [0, 1 << 40])),
    "npz:truncated": lambda f: _npz(f, "truncated"),
    "npz:garbage": lambda f: _npz(f, "garbage"),
    "npz:missing_key": lambda f: _npz(f, "missing_key"),
    "folder:is_a_file": _folder_is_a_file,
    "nan": lambda f: _tensors(f, lambda d: d["W_dec"].__setitem__((0, 0), np.nan)),
}


def setup_probe(probe, folder: Path, assets: Path) -> None:
    """Write the files a probe's `setup` names into its folder."""
    for item in probe.setup:
        if item[0] == "tokens":
            write_tokens(folder / item[1])
        elif item[0] == "file":
            (folder / item[1]).write_text(item[2])
        elif item[0] == "bytes":
            (folder / item[1]).write_bytes(bytes.fromhex(item[2]))
        elif item[0] == "sae":
            base = item[2] if len(item) > 2 else "small"
            shutil.copytree(assets / ("eval_sae" if base == "eval" else "small"), folder / "sae")
            MUTATIONS[item[1]](folder / "sae")
