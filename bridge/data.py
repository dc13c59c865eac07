"""Token rows for the language model: datasets, text files, pretokenized arrays, and packing.

Packing follows SAELens exactly (sae_lens.tokenization_and_batching): raw text is tokenized
without BOS, documents are concatenated into rows of `context_size` tokens, each row starts with
BOS when `prepend_bos`, a separator token goes between documents, and with
`disable_concat_sequences` each document gives at most one row and short ones are dropped.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsae import ConfigError, InputError, MissingFileError

if TYPE_CHECKING:
    from bridge.run_config import RunConfig


def _add_tokens(row, tokens, offset, context_size, is_start, bos, sequence_start, separator):
    """One step of SAELens' _add_tokens_to_batch, on lists."""
    prefix: list[int] = []
    pending = False
    first = tokens[offset]
    if is_start and sequence_start is not None and first != sequence_start:
        prefix.insert(0, sequence_start)
        pending = True
        first = sequence_start
    if row is None:
        if bos is not None and first != bos:
            prefix.insert(0, bos)
        needed = max(context_size - len(prefix), 0)
        row = prefix[:context_size] + list(tokens[offset : offset + needed])
        return row, offset + needed, pending and len(prefix) > context_size
    if separator is not None and first != separator:
        prefix.insert(0, separator)
    needed = max(context_size - len(row) - len(prefix), 0)
    prefix_room = max(context_size - len(row), 0)
    row = row + prefix[:prefix_room] + list(tokens[offset : offset + needed])
    return row, offset + needed, pending and len(prefix) > prefix_room


def pack_token_sequences(
    sequences: Iterator[Sequence[int]],
    context_size: int,
    *,
    bos_token_id: int | None = None,
    separator_token_id: int | None = None,
    sequence_start_token_id: int | None = None,
    disable_concat_sequences: bool = False,
) -> Iterator[list[int]]:
    """Rows of exactly `context_size` token ids from a stream of token sequences.

    Args:
        sequences: token id sequences (documents), tokenized without BOS.
        context_size: tokens per row.
        bos_token_id: put at position 0 of every row (SAELens' prepend_bos).
        separator_token_id: put between concatenated documents (SAELens' sequence_separator_token).
        sequence_start_token_id: put at the start of every document.
        disable_concat_sequences: one row per document; shorter documents are dropped.
    """
    prefix = (bos_token_id is not None) + (sequence_start_token_id is not None)
    if context_size <= prefix:
        raise ConfigError(f"context_size={context_size} leaves no room for tokens after the {prefix} prefix token(s).")
    if disable_concat_sequences:
        start = sequence_start_token_id if sequence_start_token_id is not None else bos_token_id
        for seq in sequences:
            seq = list(seq)
            if not seq:
                continue
            if start is not None and len(seq) >= context_size - 1 and seq[0] != start:
                seq = [start] + seq[: context_size - 1]
            if len(seq) >= context_size:
                yield seq[:context_size]
        return
    row = None
    for tokens in sequences:
        tokens = list(tokens)
        offset, is_start = 0, True
        while len(tokens) - offset > 0:
            row, offset, is_start = _add_tokens(
                row, tokens, offset, context_size, is_start, bos_token_id, sequence_start_token_id,
                separator_token_id,
            )
            if len(row) == context_size:
                yield row
                row = None


def special_token_ids(tokenizer) -> list[int]:
    """The structural special tokens SAELens excludes (bos, eos, pad, sep, decoder start)."""
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
    return sorted({tid for tid in (getattr(tokenizer, a, None) for a in attrs) if tid is not None})


def resolve_special_token(spec, tokenizer) -> int | None:
    """SAELens' sequence_separator_token: an id, "bos", "eos", "sep" or None."""
    if spec is None or isinstance(spec, int):
        return spec
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "sep": "sep_token_id"}
    if spec not in names:
        raise ConfigError(f"sequence_separator_token must be an int, 'bos', 'eos', 'sep' or null, got {spec!r}.")
    return getattr(tokenizer, names[spec], None)


# ------------------------------------------------------------- a run's dataset
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet", ".csv", ".npy")


def text_documents(cfg: RunConfig, split: str | None = None) -> Iterator[Any]:
    """Documents of the dataset: strings, or token-id sequences for pretokenized data."""
    path = cfg.dataset_path
    if path in ("stdlib", "embedded"):
        from bridge.corpus import stdlib_documents

        # training reads the documents in an order of the run's seed; held-out ones keep theirs
        seed = cfg.train.seed if cfg.train is not None else 0
        yield from (text for _, text in stdlib_documents(split or cfg.dataset_split, seed=seed))
        return
    local = Path(path).expanduser()
    if not local.exists() and looks_local(path):
        raise MissingFileError(f"dataset_path: {path} does not exist (a local path: it is not read from the Hub).")
    if local.is_dir() and is_saved_dataset(local):
        yield from _dataset_column(_load_saved(local, split or cfg.dataset_split), cfg)
        return
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py", ".rst"))
        if not files:
            raise InputError(f"dataset_path: folder {local} holds no .txt/.md/.py/.rst files.")
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if local.suffix == ".npy":
        yield from (row.tolist() for row in _load_npy(local))
        return
    if local.suffix == ".txt":
        yield local.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    if local.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
        if kind is None:
            raise InputError(f"dataset_path: cannot read {local.suffix!r} files (use .txt .jsonl .json .parquet .csv .npy).")
        import pyarrow

        try:
            dataset = datasets.load_dataset(kind, data_files=str(local), split="train")
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as err:  # the parser's error
            raise InputError(f"dataset_path: {local} could not be read as {kind} ({err.__cause__ or err}).") from None
    else:
        dataset = datasets.load_dataset(path, split=split or cfg.dataset_split, streaming=cfg.streaming)
    yield from _dataset_column(dataset, cfg)


def _dataset_column(dataset, cfg: RunConfig) -> Iterator[Any]:
    """The column a run reads, as SAELens' ActivationsStore picks it: with use_chat_formatting a conversation
    column (else text), otherwise pretokenized rows before text."""
    names = CHAT_COLUMNS if cfg.use_chat_formatting else ("tokens", "input_ids", "text")
    column = next((c for c in names if c in (dataset.column_names or [])), None)
    if column is None:
        raise InputError(f"dataset_path: {cfg.dataset_path} has no {' / '.join(map(repr, names))} column"
                         f"{' (use_chat_formatting is on)' if cfg.use_chat_formatting else ''} (columns: "
                         f"{dataset.column_names}).")
    for row in dataset:
        yield row[column]


CHAT_COLUMNS = ("conversation", "conversations", "messages", "text")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by the datasets library's save_to_disk (`jsae pretokenize`, SAELens'
    PretokenizeRunner): a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_saved(path: Path, split: str):
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise InputError(f"dataset_path: {path} holds the splits {list(dataset)}, not dataset_split {split!r}.")
        dataset = dataset[split]
    return dataset.with_format(None)  # rows as lists, whatever format it was saved with


def chat_token_sequences(documents: Iterator[Any], tokenizer, cfg: RunConfig) -> Iterator[list[int]]:
    """Each document through the tokenizer's chat template (SAELens' tokenize_with_chat_template): a
    conversation (a list of {"role", "content"} messages) as it is, a string as one user message."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"use_chat_formatting is true, but the tokenizer of {cfg.model_name!r} has no chat template "
                          "(tokenizer.chat_template); set use_chat_formatting: false or use a chat model's tokenizer.")
    for index, doc in enumerate(documents):
        conversation = [{"role": "user", "content": doc}] if isinstance(doc, str) else doc
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise InputError(f"dataset_path: {cfg.dataset_path!r} document {index} is {type(doc).__name__}, not text or "
                             "a conversation (a list of messages); use_chat_formatting needs untokenized data.")
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_tensors="pt", return_dict=False)
        yield ids[0].tolist()


def looks_local(path: str) -> bool:
    """Whether `dataset_path` names a local file or folder: a Hub dataset name never starts with
    '/', '.' or '~', nor ends with a data file's suffix."""
    return path.startswith(("/", ".", "~")) or Path(path).suffix in LOCAL_SUFFIXES


def _load_npy(path: Path):
    import numpy as np

    try:  # object arrays (pickles) are refused, as are files cut short
        rows = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"dataset_path: {path} is not a readable .npy array of token rows ({err}).") from None
    if rows.ndim != 2:
        raise InputError(f"dataset_path: {path} must hold a 2-D array of token rows, found shape {rows.shape}.")
    return rows  # rows are handed on as they are stored: token_rows checks their dtype and ids


def check_token_ids(row, d_vocab: int, cfg: RunConfig, index: int) -> None:
    """Refuses a pretokenized row that is not made of ids of the model's vocabulary: a negative id
    would index the embedding from its end and a float would be truncated, both without a word."""
    import numpy as np

    ids = np.asarray(row)
    if ids.size and ids.dtype.kind not in "iu":
        raise InputError(f"dataset_path: {cfg.dataset_path!r} row {index} holds {ids.dtype} values, not integer "
                         f"token ids (the model {cfg.model_name!r} has a vocabulary of {d_vocab} ids); store the "
                         "rows with an integer dtype (e.g. numpy.int32).")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
        raise InputError(f"dataset_path: {cfg.dataset_path!r} row {index} holds token ids from {int(ids.min())} to "
                         f"{int(ids.max())}, but the model {cfg.model_name!r} has a vocabulary of {d_vocab} ids "
                         f"(0 to {d_vocab - 1}); tokenize the data with this model's tokenizer.")


DOCUMENTS_PER_TOKENIZER_CALL = 32


def document_tokens(model, texts: Iterator[str]) -> Iterator[list[int]]:
    """Each text's token ids exactly as `model.to_tokens(text, prepend_bos=False, truncate=False)` gives them
    (SAELens' activations store tokenizes each document so), the tokenizer called on
    `DOCUMENTS_PER_TOKENIZER_CALL` documents at a time: a fast tokenizer encodes them in parallel.

    to_tokens is the tokenizer's ids, less the first where the tokenizer adds a BOS by itself: which of
    the two holds is read off the first document. A model whose to_tokens gives neither is asked one
    document at a time.
    """
    def one(text: str) -> list[int]:
        return model.to_tokens(text, prepend_bos=False, truncate=False, move_to_device=False)[0].tolist()

    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        return
    expected = one(first)
    yield expected
    raw = model.tokenizer([first], truncation=False)["input_ids"][0] if model.tokenizer is not None else None
    drop = 0 if raw == expected else 1 if raw is not None and raw[1:] == expected else None
    if drop is None:
        yield from map(one, texts)
        return
    while chunk := list(itertools.islice(texts, DOCUMENTS_PER_TOKENIZER_CALL)):
        for ids in model.tokenizer(chunk, truncation=False)["input_ids"]:
            yield ids[drop:]


def _with_text(documents: Iterator[Any], cfg: RunConfig) -> Iterator[Any]:
    """`documents`, refused when none holds more than whitespace: such data still packs into rows (of
    whitespace tokens) and would be trained on, epoch after epoch."""
    held = []
    for doc in documents:
        held.append(doc)
        if not isinstance(doc, str) or doc.strip():
            return itertools.chain(held, documents)
    raise InputError(f"dataset_path: {cfg.dataset_path!r} is empty or whitespace only: none of its {len(held)} "
                     "document(s) holds text to train on.")


def token_rows(cfg: RunConfig, model, *, split: str | None = None, cycle: bool = True) -> Iterator[list[int]]:
    """Rows of `context_size` token ids, packed as SAELens packs them; epochs repeat with a warning."""
    tokenizer = model.tokenizer
    if cfg.prepend_bos and (tokenizer is None or tokenizer.bos_token_id is None):
        raise ConfigError("prepend_bos is true, but the model's tokenizer has no BOS token; set prepend_bos: false.")
    separator = resolve_special_token(cfg.sequence_separator_token, tokenizer) if tokenizer is not None else None
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None

    def one_epoch() -> Iterator[list[int]]:
        documents = text_documents(cfg, split)
        first = next(documents, None)
        if first is None:
            raise InputError(f"dataset_path: {cfg.dataset_path!r} is empty.")
        documents = itertools.chain([first], documents)
        if cfg.use_chat_formatting:
            tokens = chat_token_sequences(_with_text(documents, cfg), tokenizer, cfg)
            yield from pack_token_sequences(tokens, cfg.context_size, bos_token_id=bos, separator_token_id=separator,
                                            disable_concat_sequences=cfg.disable_concat_sequences)
            return
        if not isinstance(first, str):  # pretokenized rows are used as they are
            d_vocab = model.cfg.d_vocab
            for index, row in enumerate(documents):
                check_token_ids(row, d_vocab, cfg, index)
                row = list(row)[: cfg.context_size]
                if len(row) < cfg.context_size:
                    raise InputError(f"dataset_path: pretokenized rows have {len(row)} tokens, fewer than "
                                     f"context_size={cfg.context_size}.")
                yield row
            return
        tokens = document_tokens(model, _with_text(documents, cfg))
        yield from pack_token_sequences(tokens, cfg.context_size, bos_token_id=bos, separator_token_id=separator,
                                        disable_concat_sequences=cfg.disable_concat_sequences)

    epoch = 0
    while True:
        produced = False
        for row in one_epoch():
            produced = True
            yield row
        if not produced:
            raise InputError(f"dataset_path: {cfg.dataset_path!r} gave no row of context_size={cfg.context_size} tokens.")
        if not cycle:
            return
        epoch += 1
        warnings.warn(f"dataset exhausted: starting epoch {epoch + 1} (tokens will be seen again).", stacklevel=2)


def check_token_settings(cfg: RunConfig, model) -> None:
    """Refuses the token ids a config names (sequence_separator_token, exclude_special_tokens) that are
    not in the model's vocabulary: a separator beyond it fails deep in the model's embedding, only once
    a row holds it, and an excluded id beyond it never matches, so nothing is excluded."""
    d_vocab = model.cfg.d_vocab
    named = [("exclude_special_tokens", tid) for tid in (excluded_token_ids(cfg, model) or [])]
    separator = cfg.sequence_separator_token
    if model.tokenizer is not None:
        separator = resolve_special_token(separator, model.tokenizer)
    if isinstance(separator, int):
        named.insert(0, ("sequence_separator_token", separator))
    for field, tid in named:
        if not 0 <= tid < d_vocab:
            raise ConfigError(f"{field}: {tid} is not a token id of {cfg.model_name!r}, whose vocabulary has {d_vocab} "
                              f"ids (0 to {d_vocab - 1}); choose an id of this model's tokenizer.")


def excluded_token_ids(cfg: RunConfig, model) -> list[int] | None:
    if cfg.exclude_special_tokens is True:
        return special_token_ids(model.tokenizer)
    if cfg.exclude_special_tokens:
        return [int(t) for t in cfg.exclude_special_tokens]
    return None


def heldout_split(cfg: RunConfig) -> str:
    return "heldout" if cfg.dataset_path in ("stdlib", "embedded") else cfg.dataset_split


def eval_data_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with the evals' data as its dataset_path: eval_dataset_path when set (read as dataset_path is)."""
    import dataclasses

    if cfg.eval_dataset_path is None:
        return cfg
    return dataclasses.replace(cfg, dataset_path=cfg.eval_dataset_path)
