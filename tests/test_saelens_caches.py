"""SAELens activation caches both ways: sae_lens' CacheActivationsRunner -> `jsae train`, and
`jsae cache --format saelens` -> sae_lens' trainer; the same rows, token ids and activations."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import jsae

sae_lens = pytest.importorskip("sae_lens")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

HOOK = "blocks.2.hook_resid_pre"
ROWS = 4  # store_batch_size_prompts: rows per model batch
CONTEXT = 128


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded")


def run_cfg(tmp_path, **changes):
    from bridge.runner import DEFAULT_CONFIG, RunConfig

    data = {"total_training_tokens": 2048, "train_batch_size_tokens": 512, "lr_decay_steps": 0,
            "store_batch_size_prompts": ROWS, "n_batches_in_buffer": 2, "checkpoint_path": None, "progress_bar": False,
            "n_eval_batches": 0, "eval_every_n_steps": 0, "output_path": str(tmp_path / "sae"),
            "sae": {"d_sae": 64, "k": 4}} | changes
    return RunConfig.from_yaml(DEFAULT_CONFIG, data)


def documents(cfg, n: int = 40) -> list[str]:
    """The first documents jsae's stdlib dataset gives the run, in its order (what sae_lens is fed)."""
    from bridge.corpus import stdlib_documents

    return [text for _, text in itertools.islice(stdlib_documents(cfg.dataset_split, seed=cfg.train.seed), n)]


def stored(path, hook: str = HOOK) -> tuple[np.ndarray, np.ndarray]:
    """(activations (rows, context, d_in), token ids (rows, context)) as datasets reads the folder."""
    rows = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    return rows[hook], rows["token_ids"]


def jsae_rows(cfg, model, n_rows: int) -> np.ndarray:
    from bridge.data import token_rows

    return np.asarray(list(itertools.islice(token_rows(cfg, model, cycle=False), n_rows)))


@pytest.mark.slow
def test_sae_lens_cache_trains_in_jsae(tmp_path, model, monkeypatch):
    """A cache sae_lens' CacheActivationsRunner writes on the embedded model: its rows are jsae's rows and
    activations, jsae's reader serves the slices sae_lens' store reads, and `jsae train` trains from it."""
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    from bridge import saelens_cache
    from bridge.runner import prepare, run
    from bridge.sources import activation_source

    cfg = run_cfg(tmp_path)
    # CacheActivationsRunner loads its model by name; hand it the embedded one
    monkeypatch.setattr("sae_lens.cache_activations_runner.load_model", lambda **_: model)
    path = tmp_path / "sl_cache"
    sl_cfg = CacheActivationsRunnerConfig(
        dataset_path="stdlib", model_name="embedded", model_batch_size=ROWS, hook_name=HOOK, d_in=128,
        training_tokens=4096, context_size=CONTEXT, new_cached_activations_path=str(path), shuffle=False,
        device="cpu", buffer_size_gb=2048 * 128 * 4 / 1e9, streaming=False)
    CacheActivationsRunner(sl_cfg, override_dataset=datasets.Dataset.from_dict({"text": documents(cfg)})).run()
    assert saelens_cache.cache_format(path) == "saelens"

    acts, ids = stored(path)
    assert acts.shape == (32, CONTEXT, 128) and ids.shape == (32, CONTEXT)
    # sae_lens packs the documents as jsae does: the same rows in the same order
    np.testing.assert_array_equal(ids, jsae_rows(cfg, model, 32))
    _, prepared = prepare(cfg)
    live = activation_source(dataclasses.replace(prepared, fused_forward=False), model)
    for i in (0, 7):
        tokens = torch.as_tensor(ids[i * ROWS : (i + 1) * ROWS], dtype=torch.long)
        np.testing.assert_allclose(acts[i * ROWS : (i + 1) * ROWS].reshape(-1, 128),
                                   live.model_activations(tokens).numpy(), rtol=1e-5, atol=1e-5)

    # jsae reads the model batches sae_lens' own store reads from the cache, in its order
    cached_cfg = dataclasses.replace(prepared, cached_activations_path=str(path))
    reader = saelens_cache.cached_activations(cached_cfg, HOOK, model)
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore(model=model, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
                             context_size=CONTEXT, d_in=128, n_batches_in_buffer=2, total_training_tokens=2048,
                             store_batch_size_prompts=ROWS, train_batch_size_tokens=512, prepend_bos=True,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(path))
    for ours in itertools.islice(reader.chunks(), 9):  # 8 slices, then the second epoch's first
        theirs, _ = store.get_raw_llm_batch()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    sae, _ = run(run_cfg(tmp_path, cached_activations_path=str(path)))
    assert sae.cfg.d_in == 128 and np.all(np.isfinite(np.asarray(sae.params["W_dec"])))
    assert sae_lens.SAE.load_from_disk(str(tmp_path / "sae")).cfg.d_sae == 64


@pytest.mark.slow
def test_jsae_saelens_cache_trains_in_sae_lens(tmp_path, model):
    """`jsae cache --format saelens`: the rows jsae's own cache stores, in a folder sae_lens' runner trains
    from; reading it back gives the batches of the live run with the same seed."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    from bridge.cache import read_cache_meta, write_cache
    from bridge.cli import main
    from bridge.runner import prepare
    from bridge.saelens_cache import cached_activations
    from bridge.sources import activation_source
    from jsae.io import read_safetensors

    path, ours_path = tmp_path / "cache", tmp_path / "jsae_cache"
    cfg = run_cfg(tmp_path)
    args = ["cache", "--cache-path", str(path), "--format", "saelens", "--tokens", "4096",
            "--set", f"store_batch_size_prompts={ROWS}", "--set", "sae.d_sae=64", "--set", "sae.k=4"]
    assert main(args) == 0
    _, prepared = prepare(cfg)
    write_cache(prepared, model, ours_path, n_tokens=4096)

    acts, ids = stored(path)
    assert acts.shape == (32, CONTEXT, 128)
    meta = read_cache_meta(ours_path)
    shards = [read_safetensors(ours_path / s["file"]) for s in meta["shards"]]
    np.testing.assert_array_equal(ids.reshape(-1), np.concatenate([s["token_ids"] for s in shards]))
    np.testing.assert_array_equal(acts.reshape(-1, 128), np.concatenate([s[HOOK] for s in shards]))
    np.testing.assert_array_equal(ids, jsae_rows(cfg, model, 32))

    # the batches jsae trains on from it are the live run's, batch for batch
    reader = cached_activations(dataclasses.replace(prepared, cached_activations_path=str(path)), HOOK, model)
    live = activation_source(prepared, model)
    for ours, theirs in itertools.islice(zip(reader, live, strict=False), 6):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    live.close()

    # sae_lens' runner trains from the folder (a few steps) and saves its SAE
    sl_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=128, d_sae=64, k=4), model_name="embedded", hook_name=HOOK, dataset_path="",
        use_cached_activations=True, cached_activations_path=str(path), is_dataset_tokenized=False,
        streaming=False, context_size=CONTEXT, store_batch_size_prompts=ROWS, n_batches_in_buffer=8,
        training_tokens=2048, train_batch_size_tokens=512, device="cpu", checkpoint_path=None,
        output_path=str(tmp_path / "sl_sae"), logger=LoggingConfig(log_to_wandb=False), n_eval_batches=0)
    runner = LanguageModelSAETrainingRunner(
        sl_cfg, override_model=model, override_dataset=datasets.Dataset.from_dict({"text": documents(cfg, 4)}))
    raw, token_ids = runner.activations_store.get_raw_llm_batch()
    torch.testing.assert_close(raw, torch.from_numpy(acts[:ROWS].reshape(-1, 128)), rtol=0, atol=0)
    np.testing.assert_array_equal(token_ids.numpy(), ids[:ROWS].reshape(-1))
    runner.activations_store.current_row_idx = 0
    trained = runner.run()
    assert np.all(np.isfinite(trained.W_dec.detach().numpy()))
    assert jsae.SAE.load_from_disk(tmp_path / "sl_sae").cfg.d_sae == 64


def test_exclusion_and_mixing_apply_as_the_cache_is_read(tmp_path, model):
    """A SAELens cache holds every position; exclude_special_tokens drops BOS as sae_lens' store does; the
    shuffle buffer keeps the run's activations_mixing_fraction."""
    from bridge.runner import prepare
    from bridge.saelens_cache import cached_activations, write_saelens_cache

    _, cfg = prepare(run_cfg(tmp_path))
    write_saelens_cache(cfg, model, tmp_path / "c", n_tokens=1024)
    acts, ids = stored(tmp_path / "c")
    bos = model.tokenizer.bos_token_id
    excluded = dataclasses.replace(cfg, cached_activations_path=str(tmp_path / "c"), exclude_special_tokens=[bos])
    chunk = next(cached_activations(excluded, HOOK, model).chunks())
    keep = ids[:ROWS].reshape(-1) != bos
    assert 0 < (~keep).sum() and chunk.shape[0] == keep.sum()
    np.testing.assert_array_equal(chunk.numpy(), acts[:ROWS].reshape(-1, 128)[keep])
    # activations_mixing_fraction: 0 serves the cache in its order, as sae_lens' mixing_buffer does
    in_order = dataclasses.replace(cfg, cached_activations_path=str(tmp_path / "c"), activations_mixing_fraction=0.0)
    reader = cached_activations(in_order, HOOK, model)
    reader.as_jax = False
    served = torch.cat(list(itertools.islice(iter(reader), 2)))
    np.testing.assert_array_equal(served.numpy(), acts.reshape(-1, 128)[:1024])


def test_bad_saelens_caches_are_refused(tmp_path, model):
    from bridge.runner import RunConfig, prepare
    from bridge.saelens_cache import cached_activations, write_saelens_cache

    _, cfg = prepare(run_cfg(tmp_path))
    write_saelens_cache(cfg, model, tmp_path / "c", n_tokens=1024)
    cached = dataclasses.replace(cfg, cached_activations_path=str(tmp_path / "c"))
    from bridge.dry_run import check_cache

    assert check_cache(cached, 128, model) == f"cached_activations_path: {tmp_path / 'c'} (a finished saelens cache of {HOOK})"
    with pytest.raises(jsae.ConfigError, match="holds 'blocks.2.hook_resid_pre' with width 128, not sae.d_in=64"):
        check_cache(cached, 64, model)
    with pytest.raises(jsae.FormatError, match="has no column 'blocks.1.hook_resid_pre'"):
        cached_activations(cached, "blocks.1.hook_resid_pre", model)
    with pytest.raises(jsae.FormatError, match=r"expected \(64, d_in\): context_size / seqpos_slice"):
        cached_activations(dataclasses.replace(cached, seqpos_slice=(0, 64)), HOOK, model)
    with pytest.raises(jsae.FormatError, match="fewer than store_batch_size_prompts=64"):
        cached_activations(dataclasses.replace(cached, store_batch_size_prompts=64), HOOK, model)
    ds = datasets.load_from_disk(str(tmp_path / "c")).remove_columns("token_ids")
    ds.save_to_disk(str(tmp_path / "no_ids"))
    no_ids = dataclasses.replace(cfg, cached_activations_path=str(tmp_path / "no_ids"), exclude_special_tokens=[0])
    with pytest.raises(jsae.ConfigError, match="has no 'token_ids' column"):
        cached_activations(no_ids, HOOK, model)
    with pytest.raises(jsae.ConfigError, match="set one of them"):
        RunConfig(activation_cache_path="a", cached_activations_path="b")
    with pytest.raises(jsae.FormatError, match="already exists"):
        write_saelens_cache(cfg, model, tmp_path / "c", n_tokens=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "no_ids"]  # nothing half-written left


def test_a_cut_jsae_shard_is_a_format_error(tmp_path, model):
    """jsae's cache is read from memory-mapped shards: one cut short is an error naming it, not a crash."""
    from bridge.cache import CachedActivations, write_cache
    from bridge.runner import prepare

    _, cfg = prepare(run_cfg(tmp_path))
    write_cache(cfg, model, tmp_path / "c", n_tokens=1024)
    reader = CachedActivations(tmp_path / "c", HOOK, 512)
    np.testing.assert_array_equal(next(reader.chunks()).numpy(), stored_jsae(tmp_path / "c")[: ROWS * CONTEXT])
    shard = tmp_path / "c" / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(jsae.FormatError, match="shard_00000.safetensors: not a readable cache shard"):
        next(reader.chunks())


def stored_jsae(path) -> np.ndarray:
    from jsae.io import read_safetensors

    return read_safetensors(path / "shard_00000.safetensors")[HOOK]
