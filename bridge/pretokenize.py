"""`jsae pretokenize CONFIG --save-path DIR`: a run's dataset tokenized and packed once, saved for reuse.

The folder is what SAELens' PretokenizeRunner writes (sae_lens/pretokenize_runner.py): a datasets
`save_to_disk` folder with one `input_ids` column of rows of `context_size` token ids (torch format),
and `sae_lens.json` beside it, the fields of its PretokenizedDatasetMetadata. SAELens reads it through
its pretokenized path (`is_dataset_tokenized`: rows used as they are, cut to its context_size); jsae
reads it as `dataset_path: DIR`. The rows are packed as the run would pack them (bridge.data.token_rows:
the model's tokenizer, prepend_bos, sequence_separator_token, disable_concat_sequences,
use_chat_formatting), in the dataset's order.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsae import ConfigError, InputError

if TYPE_CHECKING:
    from bridge.run_config import RunConfig

METADATA_FILE = "sae_lens.json"
ROWS_PER_CHUNK = 65536  # rows held in memory before they go to an Arrow table


def pretokenize_metadata(cfg: RunConfig, tokenizer_name: str, split: str) -> dict[str, Any]:
    """sae_lens.json: SAELens' PretokenizedDatasetMetadata fields, for rows packed as `cfg` packs them
    (a run's prepend_bos is SAELens' begin_batch_token "bos"; no token starts each document)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        saelens_version = version("sae-lens")
    except PackageNotFoundError:
        saelens_version = None
    return {
        "sae_lens_version": saelens_version,
        "tokenizer_name": tokenizer_name,
        "original_dataset": cfg.dataset_path,
        "original_dataset_name": None,
        "original_split": split,
        "original_data_files": None,
        "original_column_name": None,
        "context_size": cfg.context_size,
        "shuffled": False,
        "seed": None,
        "begin_batch_token": "bos" if cfg.prepend_bos else None,
        "begin_sequence_token": None,
        "sequence_separator_token": cfg.sequence_separator_token,
        "disable_concat_sequences": cfg.disable_concat_sequences,
        "use_chat_formatting": cfg.use_chat_formatting,
    }


def check_save_path(save_path: str | os.PathLike) -> Path:
    """The folder to write: absent (or an empty folder), with a parent that exists."""
    path = Path(save_path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--save-path: {path} already exists and is not an empty folder; choose a new path.")
    if not path.parent.is_dir():
        raise ConfigError(f"--save-path: the folder {path.parent} does not exist.")
    return path


def pretokenize(cfg: RunConfig, model, save_path: str | os.PathLike, *, split: str | None = None,
                max_rows: int | None = None) -> dict[str, Any]:
    """Write `cfg`'s dataset as packed token rows to `save_path` (one pass over the data, or `max_rows` rows).

    Returns {"rows", "context_size", "save_path"}. The folder appears whole or not at all (written
    beside it, then renamed).
    """
    import datasets

    from bridge.data import token_rows

    path = check_save_path(save_path)
    if max_rows is not None and (isinstance(max_rows, bool) or max_rows < 1):
        raise ConfigError(f"--max-rows must be >= 1, got {max_rows!r}.")
    split = split or cfg.dataset_split
    rows = token_rows(cfg, model, split=split, cycle=False)
    if max_rows is not None:
        rows = itertools.islice(rows, max_rows)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"))})
    chunks = []
    while chunk := list(itertools.islice(rows, ROWS_PER_CHUNK)):
        chunks.append(datasets.Dataset.from_dict({"input_ids": chunk}, features=features))
    if not chunks:
        raise InputError(f"dataset_path: {cfg.dataset_path!r} gave no row of context_size={cfg.context_size}.")
    dataset = chunks[0] if len(chunks) == 1 else datasets.concatenate_datasets(chunks)
    dataset.set_format(type="torch", columns=["input_ids"])  # as PretokenizeRunner saves it
    tokenizer = model.tokenizer
    tokenizer_name = getattr(tokenizer, "name_or_path", None) or cfg.model_name
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        dataset.save_to_disk(str(staging))
        metadata = pretokenize_metadata(cfg, str(tokenizer_name), split)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
        if path.exists():
            path.rmdir()  # empty, as check_save_path found it
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"rows": len(dataset), "context_size": cfg.context_size, "save_path": str(path)}


def pretokenize_command(args) -> int:
    """`jsae pretokenize`: the CLI's entry (bridge.cli wires its parser with `add_parser`)."""
    from bridge.cli import _print_report, load_config
    from bridge.model import load_model

    cfg = load_config(args)
    path = check_save_path(args.save_path)
    print(f"jsae pretokenize: {cfg.dataset_path} with {cfg.model_name}'s tokenizer, rows of {cfg.context_size} "
          f"tokens -> {path}", flush=True)
    model = load_model(cfg.model_name, model_class_name=cfg.model_class_name,
                       from_pretrained_kwargs=cfg.model_from_pretrained_kwargs, device="cpu")
    if args.dry_run:
        from bridge.dry_run import check_first_row

        row = check_first_row(cfg, model, split=args.split or cfg.dataset_split)
        _print_report("pretokenize", [f"dataset: {cfg.dataset_path}: read a first row of {len(row)} tokens",
                                      f"save_path: {path} (to be written)"], None)
        return 0
    info = pretokenize(cfg, model, path, split=args.split, max_rows=args.max_rows)
    print(f"{info['rows']:,} rows of {info['context_size']} tokens written to {info['save_path']} "
          f"(read it with dataset_path: {info['save_path']})")
    return 0


def add_parser(sub) -> None:
    """The `pretokenize` subcommand on the `jsae` parser's subparsers."""
    p = sub.add_parser("pretokenize", help="tokenize and pack a run's dataset once into a folder SAELens and jsae "
                       "read as pretokenized data")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (default: configs/default.yaml): its "
                   "model's tokenizer, dataset and packing fields")
    p.add_argument("--save-path", required=True, help="the folder to write (must not exist yet)")
    p.add_argument("--split", default=None, help="the dataset split (default: the config's dataset_split)")
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many rows (default: the whole dataset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--dry-run", action="store_true", help="check the config, tokenizer, data and save path; write "
                   "nothing")
    p.set_defaults(func=pretokenize_command)
