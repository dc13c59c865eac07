"""Token packing and activations equal sae_lens' ActivationsStore; shuffling; zero-copy hand-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge.data import pack_token_sequences
from jsae import InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 7,
    "x",
    "import os\nprint(os.getcwd())\n" * 5,
    "class A:\n    pass\n" * 9,
    "",
    "short",
] * 6


@pytest.fixture(scope="module")
def model():
    from bridge.model import load_model

    return load_model("embedded")


def saelens_store(model, **kw):
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    exclude = kw.pop("exclude", None)
    args = dict(model=model, dataset=datasets.Dataset.from_dict({"text": DOCS}), streaming=False,
                hook_name="blocks.1.hook_resid_post", hook_head_index=None, context_size=32, d_in=128,
                n_batches_in_buffer=4, total_training_tokens=10**6, store_batch_size_prompts=4,
                train_batch_size_tokens=64, prepend_bos=True, normalize_activations="none", device="cpu",
                dtype="float32", exclude_special_tokens=exclude)
    return ActivationsStore(**(args | kw))


def our_rows(model, n, context_size=32, prepend_bos=True, separator="bos", disable_concat=False):
    from bridge.runner import RunConfig, token_rows

    cfg = RunConfig.from_dict({"dataset_path": "unused", "context_size": context_size, "prepend_bos": prepend_bos,
                               "sequence_separator_token": separator, "disable_concat_sequences": disable_concat,
                               "sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                               "total_training_tokens": 10**6})
    import bridge.data

    original = bridge.data.text_documents  # token_rows reads its documents through this module's name
    bridge.data.text_documents = lambda cfg, split=None: iter(DOCS)
    try:
        rows = token_rows(cfg, model, cycle=False)
        return [next(rows) for _ in range(n)]
    finally:
        bridge.data.text_documents = original


@pytest.mark.parametrize(("prepend_bos", "separator", "disable_concat"), [
    (True, "bos", False), (False, "bos", False), (True, None, False), (True, "eos", False), (False, None, False),
    (True, "bos", True),
])
def test_token_rows_equal_saelens(model, prepend_bos, separator, disable_concat):
    store = saelens_store(model, prepend_bos=prepend_bos, sequence_separator_token=separator,
                          disable_concat_sequences=disable_concat)
    want = store.get_batch_tokens(8).tolist()
    assert our_rows(model, 8, prepend_bos=prepend_bos, separator=separator, disable_concat=disable_concat) == want


def test_packing_function_equals_saelens_on_edge_cases():
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(5, 50, size=n)) for n in (0, 1, 3, 7, 8, 9, 15, 2, 30, 1, 1, 4)]
    seqs.append([0] + list(rng.integers(5, 50, size=6)))  # a document that starts with BOS already
    for ctx in (3, 5, 8):
        for bos, sep, start in ((0, 0, None), (None, 1, None), (0, None, 2), (0, 1, 2), (None, None, None)):
            for disable in (False, True):
                want = [r.tolist() for r in concat_and_batch_sequences(
                    iter(torch.tensor(s, dtype=torch.long) for s in seqs), ctx, begin_batch_token_id=bos,
                    begin_sequence_token_id=start, sequence_separator_token_id=sep, disable_concat_sequences=disable)]
                got = list(pack_token_sequences(iter(seqs), ctx, bos_token_id=bos, separator_token_id=sep,
                                                sequence_start_token_id=start, disable_concat_sequences=disable))
                assert [list(map(int, r)) for r in got] == want, (ctx, bos, sep, start, disable)


def _tokenizer_adding_bos_and_eos(tokenizer):
    """A copy of `tokenizer` that puts BOS before and EOS after every text (as Llama-style tokenizers do)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)])
    return tokenizer


@pytest.mark.parametrize("tokenizer", ["model's", "adds BOS and EOS", "to_tokens of its own"])
def test_documents_tokenize_in_batches_as_to_tokens_tokenizes_each(model, tokenizer):
    """document_tokens calls the tokenizer on many documents at once and gives each document's ids exactly as
    `to_tokens(text, prepend_bos=False, truncate=False)` does (a BOS the tokenizer adds is dropped, an EOS kept);
    a model whose to_tokens is not the tokenizer's ids is asked one document at a time."""
    import copy

    from bridge.data import DOCUMENTS_PER_TOKENIZER_CALL, document_tokens

    model = copy.copy(model)  # the module's model keeps its tokenizer, cfg and to_tokens
    model.cfg = copy.deepcopy(model.cfg)
    if tokenizer == "adds BOS and EOS":
        model.set_tokenizer(_tokenizer_adding_bos_and_eos(model.tokenizer))
    if tokenizer == "to_tokens of its own":
        plain = model.to_tokens
        model.to_tokens = lambda text, **kw: plain(text.upper(), **kw)
    docs = DOCS * 3 + [" leading space", "trailing space ", "\n\n"]
    assert len(docs) > 2 * DOCUMENTS_PER_TOKENIZER_CALL
    want = [model.to_tokens(d, prepend_bos=False, truncate=False, move_to_device=False)[0].tolist() for d in docs]
    assert list(document_tokens(model, iter(docs))) == want
    if tokenizer == "adds BOS and EOS":
        assert want[DOCS.index("")] == [model.tokenizer.eos_token_id]


@pytest.mark.parametrize(("exclude", "seqpos"), [(False, (None,)), (True, (None,)), (False, (2, 30)),
                                                 (True, (1, None, 2))])
def test_activations_equal_saelens(model, exclude, seqpos):
    from bridge.activations import ActivationSource
    from bridge.data import special_token_ids

    store = saelens_store(model, seqpos_slice=seqpos,
                          exclude=torch.tensor(special_token_ids(model.tokenizer)) if exclude else None)
    tokens = store.get_batch_tokens(4)
    # Compare on the same token rows: sae_lens' get_activations + its filtering, and jsae's model_activations.
    from sae_lens.training.activations_store import _filter_buffer_acts

    raw = store.get_activations(tokens).reshape(-1, 128)
    kept_ids = tokens[:, slice(*seqpos)].reshape(-1)
    want = _filter_buffer_acts((raw, kept_ids), store.exclude_special_tokens)
    source = ActivationSource(model, "blocks.1.hook_resid_post", iter([]), batch_size=64, context_size=32,
                              seqpos_slice=seqpos,
                              exclude_token_ids=special_token_ids(model.tokenizer) if exclude else None)
    got = source.model_activations(tokens)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if exclude and seqpos == (None,):
        assert got.shape[0] < raw.shape[0]  # BOS rows were dropped


def test_shuffle_mixes_rows_and_serves_each_token_once(model):
    from bridge.activations import ShuffleBuffer

    n_rows, ctx, batch = 64, 32, 256
    ids = torch.arange(n_rows * ctx, dtype=torch.float32)[:, None]  # activation = global token index
    buffer = ShuffleBuffer(capacity=16 * ctx * 4, batch_size=batch, seed=0)
    served = []
    for start in range(0, n_rows, 4):  # one "model forward" of 4 rows at a time
        served += [b[:, 0].long() for b in buffer.add(ids[start * ctx:(start + 4) * ctx])]
    flat = torch.cat(served)
    assert len(flat) == len(set(flat.tolist()))  # no token twice
    for b in served:
        rows = b // ctx
        assert torch.bincount(rows).max().item() <= 0.1 * batch  # no row holds more than 10% of a batch
        assert len(torch.unique(rows)) >= 16  # each batch draws on many rows


def test_shuffle_serves_what_a_permuted_concatenation_would(model):
    """The stores and gathers give exactly the batches of the plain recipe: concatenate what is
    pending, permute, serve the front, keep the rest; with uneven chunks and one larger than
    the buffer (it grows)."""
    from bridge.activations import ShuffleBuffer

    generator = torch.Generator().manual_seed(5)
    sizes = [700, 1000, 333, 5000, 64, 999, 1024, 2048, 17, 1500, 800]
    chunks = [torch.randn(n, 6, generator=generator) for n in sizes]
    capacity, batch = 2048, 256
    buffer = ShuffleBuffer(capacity, batch, seed=9)
    got = [b.clone() for chunk in chunks for b in buffer.add(chunk)]

    permutations, keep, pending, want = torch.Generator().manual_seed(9), capacity // 2, [], []
    for chunk in chunks:
        pending.append(chunk)
        stored = torch.cat(pending)
        if stored.shape[0] < capacity:
            continue
        stored = stored[torch.randperm(stored.shape[0], generator=permutations)]
        n_serve = (stored.shape[0] - keep) // batch * batch
        want += list(stored[:n_serve].split(batch))
        pending = [stored[n_serve:]]
    assert len(got) == len(want) > 10
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert buffer.pending_tokens == sum(p.shape[0] for p in pending)
    with pytest.raises(InputError, match="shape"):
        list(buffer.add(torch.zeros(4, 7)))


def test_zero_copy_hand_off(model):
    import jax

    from bridge.activations import ActivationSource
    from bridge.dlpack import torch_to_jax
    from bridge.runner import RunConfig, token_rows

    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        t = torch.randn(256, 128).to(torch_dtype)
        x = torch_to_jax(t)
        assert x.unsafe_buffer_pointer() == t.data_ptr() and x.dtype == jax.numpy.dtype(dtype)
        cfg = RunConfig.from_dict({"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                                   "total_training_tokens": 10**5, "train_batch_size_tokens": 512})
        source = ActivationSource(model, cfg.hook_name, token_rows(cfg, model), batch_size=512, context_size=128,
                                  dtype=dtype, as_jax=False, n_batches_in_buffer=2, store_batch_size_prompts=4)
        torch_batch = next(iter(source.torch_batches()))
        handed = torch_to_jax(torch_batch)
        assert handed.unsafe_buffer_pointer() == torch_batch.data_ptr()
        # ... and the trainer's placement on the single device keeps the same buffer.
        import jsae

        trainer = jsae.Trainer(jsae.TrainConfig(sae=jsae.StandardTrainingSAEConfig(d_in=128, d_sae=256, dtype=dtype),
                                                total_training_tokens=512, train_batch_size_tokens=512, n_devices=1))
        placed = trainer._to_global(handed)
        assert placed.unsafe_buffer_pointer() == torch_batch.data_ptr()


def test_producer_thread_waits_while_another_thread_runs_the_model(model):
    """TransformerLens removes every temporary hook after a forward, so the activation producer and
    an eval during training must not run the model at the same time: both take the model's lock."""
    import threading

    from bridge.activations import ActivationSource
    from bridge.evals import run_with_saes
    from bridge.model import model_lock
    from bridge.runner import RunConfig, token_rows

    cfg = RunConfig.from_dict({"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                               "total_training_tokens": 10**5, "train_batch_size_tokens": 256, "context_size": 32})
    source = ActivationSource(model, cfg.hook_name, token_rows(cfg, model), batch_size=256, context_size=32,
                              n_batches_in_buffer=2, store_batch_size_prompts=4, as_jax=False)
    got = []
    with model_lock(model):
        thread = threading.Thread(target=lambda: got.append(next(iter(source.torch_batches()))), daemon=True)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not got  # blocked on the lock
    thread.join(timeout=60)
    assert len(got) == 1 and got[0].shape == (256, 128)

    # and the evaluator holds the same lock: forwards interleaved from two threads stay correct
    import jsae

    sae = jsae.SAE.from_config(jsae.StandardSAEConfig(d_in=128, d_sae=256), seed=0)
    tokens = torch.tensor([next(token_rows(cfg, model)) for _ in range(2)])
    with torch.no_grad():
        clean = model(tokens)
    errors = []

    def produce():
        try:
            for _, _batch in zip(range(20), source.torch_batches(), strict=False):
                pass
        except Exception as err:
            errors.append(err)

    producer = threading.Thread(target=produce)
    producer.start()
    for _ in range(10):
        with model_lock(model), torch.no_grad():
            spliced = run_with_saes(model, tokens, {cfg.hook_name: sae}, use_error_term=True)
        torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)
    producer.join(timeout=120)
    assert not errors


def test_producer_starts_filling_at_iter_before_the_first_batch(model):
    """`iter(source)` starts the producer thread, so the trainer can compile while the first buffer fills."""
    import time

    from bridge.activations import ActivationSource
    from bridge.runner import RunConfig, token_rows

    cfg = RunConfig.from_dict({"sae": {"architecture": "standard", "d_in": 128, "d_sae": 256},
                               "total_training_tokens": 10**5, "train_batch_size_tokens": 256, "context_size": 32})
    source = ActivationSource(model, cfg.hook_name, token_rows(cfg, model), batch_size=256, context_size=32,
                              n_batches_in_buffer=2, store_batch_size_prompts=4, as_jax=False, prefetch=2)
    batches = iter(source)
    try:
        deadline = time.monotonic() + 60
        while source._queue.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source._queue.qsize() == 2 and source.batches_served == 0  # produced, none drawn yet
        first = next(batches)
        assert first.shape == (256, 128) and source.batches_served == 1
    finally:
        source.close()
    assert source._thread is None
