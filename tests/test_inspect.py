"""`jsae inspect`: the streaming per-latent statistics against brute force, the report against
sae.encode recomputed on the model, the page in headless Chromium, and Neuronpedia links against sae_lens."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import jsae
from jsae.latent_stats import LatentStatsConfig, init_latent_stats, stats_to_numpy, update_latent_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
HOOK = "blocks.2.hook_resid_pre"
CHROMIUM = "/usr/bin/chromium"


def make_sae(d_sae: int = 256, k: int = 16, **metadata) -> jsae.SAE:
    meta = jsae.Metadata(hook_name=HOOK, model_name="embedded", dataset_path="stdlib", context_size=128,
                         prepend_bos=True, **metadata)
    return jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=128, d_sae=d_sae, k=k, metadata=meta), seed=3)


# ----------------------------------------------------------------- the streaming statistics, pure JAX
def test_latent_stats_equal_brute_force():
    rng = np.random.default_rng(0)
    rows, context, n, n_batches = 4, 12, 5, 3
    acts = np.where(rng.random((n_batches * rows, context, n)) < 0.3, rng.lognormal(0, 1.5, (n_batches * rows,
                                                                                               context, n)), 0.0)
    acts = acts.astype(np.float32)
    acts[:, :, 4] = 0.0  # a latent that never fires
    mask = rng.random((n_batches * rows, context)) > 0.1
    cfg = LatentStatsConfig(n_latents=n, n_top=7, n_samples=10_000, left=3, right=2, hist_bins=12,
                            hist_log10_min=-1.0, hist_log10_max=1.0)
    stats = init_latent_stats(cfg)
    for b in range(n_batches):
        part = slice(b * rows, (b + 1) * rows)
        stats = update_latent_stats(stats, acts[part], mask[part], np.int32(b * rows * context),
                                    jax_key(b), cfg=cfg)
    got = stats_to_numpy(stats)

    flat = acts.reshape(-1, n)
    fired = (flat > 0) & mask.reshape(-1, 1)
    assert got["n_tokens"] == mask.sum()
    np.testing.assert_array_equal(got["n_fired"], fired.sum(0))
    np.testing.assert_allclose(got["sum_fired"], np.where(fired, flat, 0).sum(0), rtol=1e-5)
    for i in range(n):
        logs = np.clip(np.log10(flat[fired[:, i], i]), -1.0, 1.0 - 1e-9)
        np.testing.assert_array_equal(got["histogram"][i], np.histogram(logs, bins=cfg.bin_edges())[0])
        want = np.argsort(-np.where(fired[:, i], flat[:, i], -np.inf), kind="stable")[: min(7, fired[:, i].sum())]
        kept = got["top_values"][i] > 0
        np.testing.assert_array_equal(got["top_values"][i][kept], flat[want, i])
        assert set(got["top_tokens"][i][kept]) == set(want)  # ties are rare with continuous values
        # the sample holds every firing token when it has room for all of them
        sampled = got["sample_keys"][i] >= 0
        assert sorted(got["sample_tokens"][i][sampled]) == sorted(np.flatnonzero(fired[:, i]))
        for token, window in zip(got["top_tokens"][i][kept], got["top_windows"][i][kept], strict=True):
            row, pos = divmod(int(token), context)
            for offset, value in zip(range(-3, 3), window, strict=True):
                inside = 0 <= pos + offset < context
                assert (np.isnan(value) and not inside) or value == acts[row, pos + offset, i]
    assert not (got["top_values"][4] > 0).any() and not (got["sample_keys"][4] >= 0).any()


def jax_key(i: int):
    import jax

    return jax.random.fold_in(jax.random.key(0), i)


def test_the_sample_is_uniform_over_firing_tokens():
    """Reservoir sampling by random keys: each firing token is kept with probability R / n_fired."""
    rows, context, n = 8, 16, 1
    acts = np.ones((rows, context, n), np.float32)
    cfg = LatentStatsConfig(n_latents=n, n_top=1, n_samples=16, left=0, right=0)
    hits = np.zeros(rows * context)
    for trial in range(200):
        stats = init_latent_stats(cfg)
        for b in range(2):  # two batches of 4 rows: the merge, not one top_k, decides
            stats = update_latent_stats(stats, acts[b * 4 : (b + 1) * 4], np.ones((4, context), bool),
                                        np.int32(b * 4 * context), jax_key(1000 * trial + b), cfg=cfg)
        hits[stats_to_numpy(stats)["sample_tokens"][0]] += 1
    # expected 200 * 16 / 128 = 25 per token; a sample biased to either batch would show in the halves
    assert abs(hits[:64].sum() - hits[64:].sum()) < 0.15 * hits.sum()
    assert hits.min() > 5 and hits.max() < 55


# ----------------------------------------------------------------- the report on the embedded model
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from bridge.inspect_run import inspect_config, inspect_sae

    sae = make_sae()
    out = tmp_path_factory.mktemp("inspect")
    sae.save_model(out / "sae")
    cfg = inspect_config(sae, n_tokens=2048)
    doc = inspect_sae(sae, cfg, out / "page", latents=list(range(12)), n_tokens=2048, sae_dir=str(out / "sae"))
    return sae, cfg, out / "page", doc


@pytest.fixture(scope="module")
def recomputed(report):
    """Every held-out row's latent activations, recomputed with TransformerLens' own forward and sae.encode."""
    from bridge.model import load_model

    sae, cfg, _, doc = report
    model = load_model("embedded")
    return (*encode_rows(sae, cfg, model, doc["n_rows"]), model)


def encode_rows(sae, cfg, model, n_rows):
    """(rows, latent activations (rows, context, d_sae), counted mask) by TransformerLens' own forward."""
    import torch

    from bridge.inspect_run import counted_mask, read_rows

    rows = read_rows(cfg, model, n_rows)
    _, cache = model.run_with_cache(torch.as_tensor(rows, dtype=torch.long), names_filter=[HOOK])
    acts = np.asarray(sae.encode(cache[HOOK].reshape(-1, 128).numpy())).reshape(*rows.shape, -1)
    return rows, acts, counted_mask(cfg, model, rows)


def test_inspect_writes_the_page_and_the_json(report):
    _, _, page, doc = report
    assert json.loads((page / "latents.json").read_text()) == doc
    html = (page / "index.html").read_text()
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", "")  # self-contained: nothing is fetched at view time
    assert [lat["index"] for lat in doc["latents"]] == list(range(12))
    assert doc["n_tokens"] > 1500 and doc["hook_name"] == HOOK and doc["split"] == "heldout"


def test_every_reported_value_equals_sae_encode_at_that_token(report, recomputed):
    _, _, _, doc = report
    rows, acts, mask, _ = recomputed
    checked = 0
    for lat in doc["latents"]:
        examples = lat["top_contexts"] + [ex for q in lat["quantiles"] for ex in q["examples"]]
        for ex in examples:
            want = acts[ex["row"], ex["position"], lat["index"]]
            assert ex["value"] == pytest.approx(want, rel=1e-5, abs=1e-5)
            start = ex["position"] - ex["centre"]
            np.testing.assert_allclose(ex["activations"], acts[ex["row"], start : start + len(ex["tokens"]),
                                                              lat["index"]], rtol=1e-5, atol=1e-5)
            assert ex["token_ids"] == rows[ex["row"], start : start + len(ex["tokens"])].tolist()
            checked += 1
    assert checked > 100


def test_density_histogram_and_top_contexts_equal_brute_force(report, recomputed):
    _, _, _, doc = report
    _, acts, mask, _ = recomputed
    assert doc["n_tokens"] == mask.sum()
    for lat in doc["latents"]:
        values = acts[..., lat["index"]][mask]
        assert lat["n_fired"] == (values > 0).sum() and lat["density"] == pytest.approx((values > 0).mean())
        assert sum(lat["histogram"]) == lat["n_fired"]
        want = np.sort(values[values > 0])[::-1][:20]
        np.testing.assert_allclose([ex["value"] for ex in lat["top_contexts"]], want, rtol=1e-5, atol=1e-5)
        assert lat["max_activation"] == pytest.approx(want[0] if len(want) else 0.0, rel=1e-5)
    assert any(lat["quantiles"] for lat in doc["latents"])


def test_promoted_and_suppressed_tokens_are_the_decoder_row_through_W_U(report, recomputed):
    sae, _, _, doc = report
    model = recomputed[3]
    W_U = model.W_U.detach().numpy()
    for lat in doc["latents"][:4]:
        logits = np.asarray(sae.W_dec)[lat["index"]] @ W_U
        assert [t["id"] for t in lat["promoted"]] == np.argsort(-logits)[:10].tolist()
        assert [t["id"] for t in lat["suppressed"]] == np.argsort(logits)[:10].tolist()
        np.testing.assert_allclose([t["logit"] for t in lat["promoted"]], np.sort(logits)[::-1][:10], rtol=1e-5)


def test_decoder_rows_reach_the_residual_stream_as_sae_dashboard_maps_them(recomputed):
    from bridge.inspect_run import residual_directions

    model, latents = recomputed[3], [1, 5]

    def sae_at(hook, d_in, **meta):
        cfg = jsae.StandardSAEConfig(d_in=d_in, d_sae=8, metadata=jsae.Metadata(hook_name=hook, **meta))
        sae = jsae.SAE.from_config(cfg, seed=1)
        return sae, np.asarray(sae.W_dec)[latents]

    W_O = model.blocks[1].attn.W_O.detach().numpy()  # (n_heads 4, d_head 32, d_model 128)
    sae, rows = sae_at("blocks.1.attn.hook_z", 128)
    np.testing.assert_allclose(residual_directions(sae, model, "blocks.1.attn.hook_z", None, latents),
                               np.einsum("lhd,hdm->lm", rows.reshape(2, 4, 32), W_O), rtol=1e-5, atol=1e-6)
    sae, rows = sae_at("blocks.1.attn.hook_z", 32)
    np.testing.assert_allclose(residual_directions(sae, model, "blocks.1.attn.hook_z", 2, latents), rows @ W_O[2],
                               rtol=1e-5, atol=1e-6)
    sae, rows = sae_at("blocks.0.mlp.hook_post", 512)
    np.testing.assert_allclose(residual_directions(sae, model, "blocks.0.mlp.hook_post", None, latents),
                               rows @ model.blocks[0].mlp.W_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    sae, rows = sae_at(HOOK, 128)
    np.testing.assert_array_equal(residual_directions(sae, model, HOOK, None, latents), rows)
    sae, rows = sae_at("blocks.1.attn.hook_q", 128)  # d_model wide, but not a residual-stream direction
    assert residual_directions(sae, model, "blocks.1.attn.hook_q", None, latents) is None
    transcoder = jsae.SAE.from_config(jsae.TranscoderConfig(d_in=128, d_sae=8, d_out=128, metadata=jsae.Metadata(
        hook_name="blocks.1.attn.hook_q", hook_name_out="blocks.1.hook_mlp_out")), seed=1)
    np.testing.assert_array_equal(residual_directions(transcoder, model, "blocks.1.attn.hook_q", None, latents),
                                  np.asarray(transcoder.W_dec)[latents])


def test_an_attention_hook_z_sae_sees_its_heads(tmp_path, recomputed):
    """An SAE with reshape_activations: hook_z gets (tokens, n_heads, d_head) input, as sae_lens feeds it."""
    import torch

    from bridge.inspect_run import inspect_config, inspect_sae

    hook = "blocks.1.attn.hook_z"
    meta = jsae.Metadata(hook_name=hook, model_name="embedded", dataset_path="stdlib", context_size=128,
                         prepend_bos=True)
    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=128, d_sae=32, reshape_activations="hook_z",
                                                      metadata=meta), seed=2)
    cfg = inspect_config(sae, n_tokens=256)
    doc = inspect_sae(sae, cfg, tmp_path / "page", latents=[0, 7, 31], n_tokens=256)
    rows, model = recomputed[0][: doc["n_rows"]], recomputed[3]
    _, cache = model.run_with_cache(torch.as_tensor(rows, dtype=torch.long), names_filter=[hook])
    acts = np.asarray(sae.encode(cache[hook].reshape(-1, 4, 32).numpy())).reshape(*rows.shape, -1)
    for lat in doc["latents"]:
        assert lat["top_contexts"]
        for ex in lat["top_contexts"]:
            assert ex["value"] == pytest.approx(acts[ex["row"], ex["position"], lat["index"]], rel=1e-5, abs=1e-5)


def test_the_page_data_survives_markup_in_tokens():
    from jsae.dashboard import render_dashboard

    doc = {"hook_name": "h</title><b>", "latents": [{"token": "</script><script>alert(1)</script>", "x": "a & b"}]}
    html = render_dashboard(doc)
    assert html.count("</script>") == 2 and "<b>" not in html
    data = re.search(r'<script type="application/json" id="jsae-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(data) == doc


# ----------------------------------------------------------------- the command line
def test_top_density_picks_the_densest_latents(tmp_path, capsys):
    from bridge.cli import main
    from bridge.inspect_run import inspect_config
    from bridge.model import load_model

    sae = make_sae(d_sae=128)
    sae.save_model(tmp_path / "sae")
    assert main(["inspect", str(tmp_path / "sae"), "--top-density", "5", "--tokens", "1024"]) == 0
    doc = json.loads((tmp_path / "sae" / "inspect" / "latents.json").read_text())
    assert len(doc["latents"]) == 5 and (tmp_path / "sae" / "inspect" / "index.html").is_file()
    _, acts, mask = encode_rows(sae, inspect_config(sae, n_tokens=1024), load_model("embedded"), doc["n_rows"])
    density = (acts[mask] > 0).mean(0)
    chosen = [lat["index"] for lat in doc["latents"]]
    np.testing.assert_allclose([lat["density"] for lat in doc["latents"]], density[chosen])
    assert density[chosen].min() >= np.delete(density, chosen).max() > 0  # ties may go either way
    assert list(density[chosen]) == sorted(density[chosen], reverse=True)


def test_dry_run_checks_and_writes_nothing(tmp_path, capsys):
    from bridge.cli import main

    make_sae().save_model(tmp_path / "sae")
    assert main(["inspect", str(tmp_path / "sae"), "--latents", "0-3", "--out", str(tmp_path / "page"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 latents" in out and "will be created" in out and not (tmp_path / "page").exists()


@pytest.mark.parametrize("argv,message", [
    (["--latents", "0-300"], "outside the SAE's latents 0 to 255"),
    (["--latents", "x"], "expected indices and ranges"),
    (["--top-density", "0"], "--top-density"),
    (["--tokens", "0"], "--tokens"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    from bridge.cli import main

    make_sae().save_model(tmp_path / "sae")
    assert main(["inspect", str(tmp_path / "sae"), *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------- the page in a browser
def chromium(args: list[str], user_data: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to its console, uncaught exceptions included (Chromium logs them as CONSOLE lines)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
def test_the_page_renders_in_chromium_with_the_latents_examples(report, tmp_path):
    from PIL import Image

    _, _, page, doc = report
    lat = max(doc["latents"], key=lambda lat: len(lat["top_contexts"]))
    url = f"{(page / 'index.html').as_uri()}#latent-{lat['index']}"

    # the detector sees console errors and uncaught exceptions on a page that has them
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('broken'); missing();</script></body></html>")
    assert len(console_messages(chromium(["--dump-dom", bad.as_uri()], tmp_path / "u0").stderr)) == 2

    dom = chromium(["--dump-dom", url], tmp_path / "u1")
    assert dom.returncode == 0 and console_messages(dom.stderr) == []
    main = dom.stdout[dom.stdout.index('<main id="main">'):]
    assert f"Latent {lat['index']}</h1>" in main
    drawn = html.unescape(re.sub(r"<[^>]+>", "", main[main.index('<div id="top-contexts">'):]))
    for ex in lat["top_contexts"]:  # each example's tokens, in order, drawn by the page's script
        assert "".join(t.replace("\n", "\u21b5").replace("\t", "\u21e5") for t in ex["tokens"]) in drawn

    shot = tmp_path / "shot.png"
    run = chromium([f"--screenshot={shot}", "--window-size=1200,1400", url], tmp_path / "u2")
    assert run.returncode == 0 and console_messages(run.stderr) == []
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10  # not blank
    orange = (pixels[..., 0] > 230) & (np.abs(pixels[..., 1] - 130) < 40) & (pixels[..., 2] < 90)
    assert orange.sum() > 500  # the strongest tokens of the examples are painted in the activation colour


# ----------------------------------------------------------------- Neuronpedia
def test_neuronpedia_links_equal_sae_lens(monkeypatch):
    import webbrowser

    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.analysis import neuronpedia_integration as np_lens

    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    meta = {"neuronpedia_id": "gpt2-small/8-res-jb", "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre"}
    ref_cfg = StandardSAEConfig(d_in=8, d_sae=32)
    for key, value in meta.items():
        setattr(ref_cfg.metadata, key, value)
    ref = StandardSAE(ref_cfg)
    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=8, d_sae=32, metadata=jsae.Metadata(meta)))

    np_lens.open_neuronpedia_feature_dashboard(ref, 17)
    assert jsae.neuronpedia_url(sae, 17) == opened[-1] == "https://neuronpedia.org/gpt2-small/8-res-jb/17"
    for name in ("temporary_list", "my list / ü & co"):
        assert jsae.neuronpedia_quick_list(sae, [3, 0, 31], name=name) == np_lens.get_neuronpedia_quick_list(
            ref, [3, 0, 31], name=name)
    assert jsae.neuronpedia_quick_list(sae, [1]) == np_lens.get_neuronpedia_quick_list(ref, [1])


def test_neuronpedia_errors_name_the_field():
    sae = make_sae()
    with pytest.raises(jsae.ConfigError, match="metadata.neuronpedia_id"):
        jsae.neuronpedia_url(sae, 0)
    linked = sae.replace(cfg=sae.cfg.replace(metadata=sae.cfg.metadata.replace(neuronpedia_id="embedded/2-res")))
    with pytest.raises(jsae.ConfigError, match="d_sae=256"):
        jsae.neuronpedia_url(linked, 256)
    assert jsae.neuronpedia_url(linked, 255).endswith("/embedded/2-res/255")


# ----------------------------------------------------------------- size
@pytest.mark.slow
def test_64_latents_over_100k_tokens(tmp_path, capsys):
    """The documented size: 64 latents over 100k held-out tokens (the time is printed, not asserted)."""
    from bridge.cli import main

    make_sae(d_sae=1024, k=32).save_model(tmp_path / "sae")
    start = time.perf_counter()
    assert main(["inspect", str(tmp_path / "sae"), "--latents", "0-63", "--tokens", "100000"]) == 0
    elapsed = time.perf_counter() - start
    doc = json.loads((tmp_path / "sae" / "inspect" / "latents.json").read_text())
    assert len(doc["latents"]) == 64 and doc["n_rows"] * doc["context_size"] >= 100_000
    with capsys.disabled():
        print(f"\njsae inspect: 64 latents over {doc['n_tokens']:,} tokens in {elapsed:.1f} s")
    shutil.rmtree(tmp_path / "sae" / "inspect")
