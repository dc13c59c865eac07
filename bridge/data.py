"""Token rows for the language model: datasets, text files, pretokenized arrays, and packing.

Packing follows SAELens exactly (sae_lens.tokenization_and_batching): raw text is tokenized
without BOS, documents are concatenated into rows of `context_size` tokens, each row starts with
BOS when `prepend_bos`, a separator token goes between documents, and with
`disable_concat_sequences` each document gives at most one row and short ones are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


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
        from jsae import ConfigError

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
        from jsae import ConfigError

        raise ConfigError(f"sequence_separator_token must be an int, 'bos', 'eos', 'sep' or null, got {spec!r}.")
    return getattr(tokenizer, names[spec], None)


def iterate_texts(dataset) -> Iterable:
    """Rows of a text source: a list of strings, or a datasets.Dataset/IterableDataset."""
    yield from dataset
