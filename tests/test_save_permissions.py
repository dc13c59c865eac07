"""save_model writes folders as `mkdir` / `open` would: umask permissions, symlinks left alone, no unsafe targets."""

from __future__ import annotations

import os
import stat

import pytest

import jsae


@pytest.fixture
def sae():
    return jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=4, d_sae=8), seed=0)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_folder_and_files_follow_the_umask(sae, tmp_path, umask_022):
    sae_with_sparsity = sae.replace(sparsity=[-1.0] * 8)
    sae_with_sparsity.save_model(tmp_path / "out")
    assert mode(tmp_path / "out") == 0o755
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert mode(tmp_path / "out" / name) == 0o644, name


def test_other_umask(sae, tmp_path):
    old = os.umask(0o027)
    try:
        sae.save_model(tmp_path / "out")
    finally:
        os.umask(old)
    assert mode(tmp_path / "out") == 0o750
    assert mode(tmp_path / "out" / "sae_weights.safetensors") == 0o640


def test_overwriting_keeps_normal_permissions(sae, tmp_path, umask_022):
    target = tmp_path / "out"
    target.mkdir()
    assert mode(target) == 0o755
    sae.save_model(target)
    sae.save_model(target)
    assert mode(target) == 0o755
    assert mode(target / "sae_weights.safetensors") == 0o644


def test_symlinks_in_the_folder_stay_links(sae, tmp_path):
    target = tmp_path / "out"
    sae.save_model(target)
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("shared notes")
    (target / "notes.txt").symlink_to(elsewhere / "notes.txt")
    (target / "data").symlink_to(elsewhere, target_is_directory=True)
    (target / "dangling").symlink_to(tmp_path / "missing")
    sae.save_model(target)
    assert (target / "notes.txt").is_symlink()
    assert os.readlink(target / "notes.txt") == str(elsewhere / "notes.txt")
    assert (target / "data").is_symlink() and (target / "dangling").is_symlink()
    assert (elsewhere / "notes.txt").read_text() == "shared notes"
    assert jsae.SAE.load_from_disk(target).d_sae == 8


def test_symlink_inside_a_subfolder_stays_a_link(sae, tmp_path):
    target = tmp_path / "out"
    sae.save_model(target)
    (tmp_path / "big.bin").write_bytes(b"x" * 10)
    (target / "extra").mkdir()
    (target / "extra" / "big.bin").symlink_to(tmp_path / "big.bin")
    sae.save_model(target)
    assert (target / "extra" / "big.bin").is_symlink()


def test_folder_that_is_a_symlink_is_written_through(sae, tmp_path):
    real = tmp_path / "run_1"
    sae.save_model(real)
    (tmp_path / "latest").symlink_to(real, target_is_directory=True)
    folded = sae.fold_W_dec_norm()
    weights, cfg = folded.save_model(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink()
    assert weights == tmp_path / "latest" / "sae_weights.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = jsae.SAE.load_from_disk(real)
    assert (loaded.W_dec == folded.W_dec).all()


@pytest.mark.parametrize("path", ["", ".", "./"])
def test_current_folder_is_refused(sae, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(jsae.JsaeError, match=r"cannot write SAE folder .*the current folder"):
        sae.save_model(path)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_parent_of_current_folder_is_refused(sae, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(jsae.JsaeError, match=r"cannot write SAE folder '\.\.'.*contains the current folder"):
        sae.save_model("..")
    with pytest.raises(jsae.JsaeError, match="contains the current folder"):
        sae.save_model(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["work"]


def test_dangling_link_as_the_folder_is_refused(sae, tmp_path):
    (tmp_path / "latest").symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(jsae.JsaeError, match=r"latest: it is a symbolic link to .*gone, which does not exist"):
        sae.save_model(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and not (tmp_path / "gone").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
