"""Reading torch.save checkpoints without torch: every tensor exact, nothing but tensors accepted."""

from __future__ import annotations

import collections
import datetime

import ml_dtypes
import numpy as np
import pytest
import torch

import jsae
from jsae.converters._torch_pickle import load_torch_checkpoint, tensor_dict


def test_tensors_of_every_dtype_and_layout(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    state = collections.OrderedDict(
        f32=base, transposed=base.T, sliced=base[1:4, ::2], f16=base.half(), bf16=base.bfloat16(), f64=base.double(),
        scalar=torch.tensor(0.25), ints=torch.arange(7), flags=base > 0, param=torch.nn.Parameter(base.clone()),
        empty=torch.zeros(0, 3),
    )
    torch.save(state, tmp_path / "ck.pt")
    out = tensor_dict(tmp_path / "ck.pt")
    assert list(out) == list(state)
    for name, tensor in state.items():
        expect = tensor.detach()
        expect = expect.float().numpy().astype(ml_dtypes.bfloat16) if expect.dtype == torch.bfloat16 else expect.numpy()
        assert out[name].dtype == expect.dtype and out[name].shape == expect.shape, name
        np.testing.assert_array_equal(out[name], expect, err_msg=name)


def test_nested_containers(tmp_path):
    torch.save({"sae": {"W": torch.ones(2, 2)}, "steps": 3, "names": ["a", "b"]}, tmp_path / "ck.pt")
    obj = load_torch_checkpoint(tmp_path / "ck.pt")
    assert obj["steps"] == 3 and obj["names"] == ["a", "b"] and obj["sae"]["W"].sum() == 4
    with pytest.raises(jsae.FormatError, match="state dict of tensors"):
        tensor_dict(tmp_path / "ck.pt")


def test_other_pickled_objects_are_refused(tmp_path):
    torch.save({"W": torch.ones(2), "when": datetime.date(2024, 1, 1)}, tmp_path / "ck.pt")
    with pytest.raises(jsae.FormatError, match=r"datetime\.date"):
        load_torch_checkpoint(tmp_path / "ck.pt")


def test_legacy_and_non_checkpoint_files(tmp_path):
    torch.save({"W": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(jsae.FormatError, match="legacy format"):
        load_torch_checkpoint(tmp_path / "legacy.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(jsae.FormatError):
        load_torch_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(jsae.MissingFileError):
        load_torch_checkpoint(tmp_path / "absent.pt")
