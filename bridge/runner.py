"""The run's names under their former home; each now lives in the module of its concern:

bridge.run_config (RunConfig), bridge.data (a run's dataset), bridge.sources (training batches),
bridge.run (the training run), bridge.summaries, bridge.eval_run (`jsae eval` and training evals).
Existing `from bridge.runner import ...` code keeps working unchanged.
"""

from __future__ import annotations

from bridge.data import _load_npy, excluded_token_ids, heldout_split, text_documents, token_rows
from bridge.eval_run import (
    eval_config,
    eval_ignored_tokens,
    eval_run_config,
    eval_token_batches,
    evaluate_sae,
    load_eval_model,
    make_evaluator,
)
from bridge.run import prepare, run, run_members, summarise
from bridge.run_config import CONFIG_DIR, DEFAULT_CONFIG, RunConfig, load_yaml
from bridge.sources import activation_source, cached_source, stacked_hooks, training_batches
from bridge.summaries import SUMMARY_COLUMNS, sae_summary, summary_row, summary_table, write_summary_table

__all__ = [
    "CONFIG_DIR", "DEFAULT_CONFIG", "SUMMARY_COLUMNS", "RunConfig", "_load_npy", "activation_source", "cached_source",
    "eval_config", "eval_ignored_tokens", "eval_run_config", "eval_token_batches", "evaluate_sae",
    "excluded_token_ids", "heldout_split", "load_eval_model", "load_yaml", "make_evaluator", "prepare", "run",
    "run_members", "sae_summary", "stacked_hooks", "summarise", "summary_row", "summary_table", "text_documents",
    "token_rows", "training_batches", "write_summary_table",
]
