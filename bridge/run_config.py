"""A `jsae train` run config: the model / hook / dataset fields (SAELens' runner names), the
training fields of `jsae.TrainConfig` and an `sae:` section, read from YAML.

YAML is read with `load_yaml` everywhere (config files and `--set` values alike), so a value
means the same thing wherever it is written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jsae import ConfigError, MissingFileError, TrainConfig
from jsae._errors import close_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2's floats (what users write: 3e-4, 1e5, .5, -2E-3) plus YAML 1.1's (1_000.5, 1:30.5,
# .inf, .nan). Every alternative needs a '.', an exponent or a name, so integers stay integers.
FLOAT_PATTERN = re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""", re.VERBOSE)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2's float syntax (PyYAML reads 3e-4 as the string "3e-4"), and a key
    given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                            f"found the key {key.value!r} twice", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "-+0123456789.":
    # first in the list: a float is tried before int and timestamp, as in SafeLoader
    ConfigLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (FLOAT_TAG, FLOAT_PATTERN))


def load_yaml(text: str) -> Any:
    """One YAML document (a config file's text or a `--set` value) with `ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (ConfigLoader is a SafeLoader)



def _check_numbers(data: Mapping[str, Any], types: Mapping[str, Any], where: str) -> None:
    """A string where a number field goes is the user's typo (or YAML they expected to be a number):
    say so by name, before a comparison deep in the config's checks fails on the string."""
    for key, value in data.items():
        kind = str(types.get(key, "")).split(" ")[0]
        if kind in ("int", "float") and isinstance(value, Mapping | list):  # e.g. --set lr.x=1
            raise ConfigError(f"{where}: {key} must be a number, got {'a mapping' if isinstance(value, Mapping) else 'a list'}"
                              f" ({value!r}).")
        if kind in ("int", "float") and isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a number, got the string {value!r}"
                              + (" (write floats as 0.001, 1e-3 or 3e-4)." if kind == "float" else "."))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the activations come from (SAELens' runner field names).

    Attributes:
        model_name: "embedded" (shipped), an official TransformerLens name, or a local folder; with
            AutoModelForCausalLM, a Hugging Face model name (Hub or local cache) or folder.
        model_class_name: "HookedTransformer", or "AutoModelForCausalLM" for any transformers causal LM,
            whose hook names are module paths (SAELens' HookedProxyLM; see bridge/hf_model.py).
        model_from_pretrained_kwargs: passed to HookedTransformer.from_pretrained, or to the transformers
            model's from_pretrained (dtype, revision, trust_remote_code: off unless set).
        hook_name: the hook point the SAE reads, e.g. "blocks.2.hook_resid_pre" ("model.layers.8" for a
            Hugging Face model: the module's output, its first element when a tuple).
        hook_head_index: keep one attention head of a hook_z-style hook.
        hook_name_out: the hook a transcoder learns to produce from hook_name (its target, e.g.
            "blocks.1.hook_mlp_out"); needs a transcoder `sae.architecture`, which it alone allows.
        hook_names: several hook points (same width) read in one model forward, each training its own
            SAE (or sweep); replaces hook_name. Folders: <output_path>/<hook>[/<sweep member>].
        sweep: zipped sweep axes, e.g. {"sae.k": [16, 32], "lr": [1e-3, 3e-4]}: one SAE per position,
            all trained in one compiled step on the same activations (see jsae.training.sweep).
        dataset_path: "stdlib" (the embedded corpus), a Hugging Face dataset name, a local data
            file (.txt / .jsonl / .json / .parquet / .csv / .npy of token rows) or a folder of text files.
        dataset_split: split of a Hugging Face dataset.
        streaming: stream a Hub dataset instead of downloading it.
        context_size: tokens per row.
        prepend_bos: put BOS at position 0 of every row.
        sequence_separator_token: between concatenated documents: "bos", "eos", "sep", a token id or null.
        exclude_special_tokens: drop activations of BOS/EOS/PAD/SEP tokens (true), or of the listed ids.
        seqpos_slice: [start, stop(, step)] positions of each row that are kept.
        disable_concat_sequences: one row per document; shorter documents are dropped.
        use_chat_formatting: tokenize each document with the tokenizer's chat template (SAELens' field): a
            conversation column ("conversation", "conversations", "messages") as it is, text as one user message.
        eval_dataset_path: where the evals' held-out rows come from instead of dataset_path's held-out split
            (any value dataset_path takes; its dataset_split is read); null: dataset_path.
        store_batch_size_prompts: rows per model forward.
        n_batches_in_buffer: shuffle-buffer size, in model forwards.
        activations_mixing_fraction: the fraction of the shuffle buffer kept to mix with the next refill
            (SAELens' field and default); 0 serves activations in the order the model produced them.
        n_eval_batches: held-out batches the evals (during training and at the end) run on; 0 turns evals off.
        eval_batch_size_prompts: rows per eval batch (None: store_batch_size_prompts).
        device: torch device of the model: "auto" (CUDA when torch sees CUDA and JAX runs on a GPU, else
            the CPU; see bridge.model.resolve_device), "cpu", "cuda" or "cuda:N".
        jax_memory_fraction: with the model on the GPU JAX runs on, the fraction of GPU memory JAX
            preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION); null: JAX allocates on demand
            (XLA_PYTHON_CLIENT_PREALLOCATE=false). JAX's own variables, when set, win (see docs/gpu.md).
        data_shards: the token rows are dealt into this many shards, each with its own shuffle buffer;
            each process of a multi-process run trains on its share of them (default: one per process). The
            batches depend on data_shards only, not on how many processes share them (bridge.distributed).
        act_store_device: where the shuffle buffer lives: "with_model" (the model's device) or "cpu"
            (pinned host memory when the model is on CUDA).
        activations_dtype: the dtype of the shuffle buffer and of the batches JAX trains on: "float32" or
            "bfloat16".
        fused_forward: the forwards that feed training run fused attention (torch's
            scaled_dot_product_attention), one-pass LayerNorms (the block's first once), one product for q,
            k and v, and oneDNN products on CPU with the MLP's activation inside the first, wherever nothing
            reads what they skip (see bridge/fused_forward.py); the activations equal TransformerLens'
            within float error. false: TransformerLens' forward as written.
        activation_cache_path: train from a cache written by `jsae cache` instead of the model.
        autocast: SAELens' flag for training the SAE under torch.autocast: true sets the training
            products' `compute_dtype` to bfloat16 (float32 accumulation; see docs/gpu.md).
        autocast_lm: run the model's forwards that produce activations under torch.autocast (bfloat16),
            as SAELens' activation store does.
        cached_activations_path: SAELens' name for the same: a cache folder of either layout (jsae's, or the
            `datasets` folder sae_lens' CacheActivationsRunner and `jsae cache --format saelens` write).
        use_cached_activations: SAELens' switch for cached_activations_path. true: train from the cache,
            by default at SAELens' path activations/{dataset_path}/{model_name}/{hook_name}[_{hook_head_index}]
            ('/' in the names as '_'); false: train from the model, leaving cached_activations_path unused
            as SAELens does. Not given: a cache path given is the cache to train from.
        train: the SAE and training settings (None for a config that only evaluates).
    """

    model_name: str = "embedded"
    model_class_name: str = "HookedTransformer"
    model_from_pretrained_kwargs: dict = dataclasses.field(default_factory=dict)
    hook_name: str = "blocks.2.hook_resid_pre"
    hook_head_index: int | None = None
    hook_names: list | None = None
    hook_name_out: str | None = None
    sweep: dict = dataclasses.field(default_factory=dict)
    dataset_path: str = "stdlib"
    dataset_split: str = "train"
    streaming: bool = False
    context_size: int = 128
    prepend_bos: bool = True
    sequence_separator_token: int | str | None = "bos"
    exclude_special_tokens: bool | list = False
    seqpos_slice: tuple = (None,)
    disable_concat_sequences: bool = False
    use_chat_formatting: bool = False
    eval_dataset_path: str | None = None
    store_batch_size_prompts: int = 16
    n_batches_in_buffer: int = 32
    activations_mixing_fraction: float = 0.5
    n_eval_batches: int = 10
    eval_batch_size_prompts: int | None = None
    device: str = "auto"
    jax_memory_fraction: float | None = None
    data_shards: int | None = None
    act_store_device: str = "with_model"
    activations_dtype: str = "float32"
    fused_forward: bool = True
    autocast: bool = False
    autocast_lm: bool = False
    activation_cache_path: str | None = None
    cached_activations_path: str | None = None
    use_cached_activations: bool | None = None
    train: TrainConfig | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # a name, path or flag of another type would be misread later
            value, kind = getattr(self, field.name), str(field.type)
            if kind in ("str", "str | None") and not (isinstance(value, str) or (value is None and "None" in kind)):
                raise ConfigError(f"{field.name} must be a string{' or null' if 'None' in kind else ''}, got {value!r}.")
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{field.name} must be true or false, got {value!r}.")
            if kind == "dict" and not isinstance(value, Mapping):
                raise ConfigError(f"{field.name} must be a mapping, got {value!r}.")
            if kind == "list | None" and not (value is None or isinstance(value, list | tuple)):
                raise ConfigError(f"{field.name} must be a list or null, got {value!r}.")
        if not isinstance(self.seqpos_slice, list | tuple):
            raise ConfigError(f"seqpos_slice: expected a list [start, stop] or [start, stop, step], got "
                              f"{self.seqpos_slice!r}.")
        object.__setattr__(self, "seqpos_slice", tuple(self.seqpos_slice))
        for name in ("context_size", "store_batch_size_prompts", "n_batches_in_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.act_store_device not in ("with_model", "cpu"):
            raise ConfigError(f"act_store_device must be 'with_model' or 'cpu', got {self.act_store_device!r}.")
        if self.activations_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"activations_dtype must be 'float32' or 'bfloat16', got {self.activations_dtype!r}.")
        shards = self.data_shards
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
            raise ConfigError(f"data_shards must be a positive integer or null (one per process), got {shards!r}.")
        fraction = self.jax_memory_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                     or not 0 < fraction <= 1):
            raise ConfigError(f"jax_memory_fraction must be a number in (0, 1] or null (allocate on demand), got "
                              f"{fraction!r}.")
        for name in ("autocast", "autocast_lm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string (auto, cpu, cuda or cuda:N), got {self.device!r}.")
        mixing = self.activations_mixing_fraction
        if isinstance(mixing, bool) or not isinstance(mixing, int | float) or not 0 <= mixing <= 1:
            raise ConfigError(f"activations_mixing_fraction must be a number in [0, 1] (the fraction of the shuffle "
                              f"buffer kept for mixing; 0: no shuffling), got {mixing!r}.")
        if not isinstance(self.use_chat_formatting, bool):
            raise ConfigError(f"use_chat_formatting must be true or false, got {self.use_chat_formatting!r}.")
        if self.eval_dataset_path is not None and (not isinstance(self.eval_dataset_path, str)
                                                   or not self.eval_dataset_path):
            raise ConfigError(f"eval_dataset_path must be a dataset path or null, got {self.eval_dataset_path!r}.")
        if not isinstance(self.fused_forward, bool):
            raise ConfigError(f"fused_forward must be true or false, got {self.fused_forward!r}.")
        if isinstance(self.n_eval_batches, bool) or not isinstance(self.n_eval_batches, int) or self.n_eval_batches < 0:
            raise ConfigError(f"n_eval_batches must be an integer >= 0 (0: no evals), got {self.n_eval_batches!r}.")
        if self.eval_batch_size_prompts is not None and (
                isinstance(self.eval_batch_size_prompts, bool) or not isinstance(self.eval_batch_size_prompts, int)
                or self.eval_batch_size_prompts <= 0):
            raise ConfigError(f"eval_batch_size_prompts must be a positive integer or null, got "
                              f"{self.eval_batch_size_prompts!r}.")
        if self.hook_names is not None:
            names = self.hook_names
            if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"hook_names must be a non-empty list of hook point names, got {names!r}.")
            if len(set(names)) != len(names):
                raise ConfigError(f"hook_names lists a hook twice: {names}.")
            object.__setattr__(self, "hook_names", list(names))
        self._check_transcoder()
        if self.use_cached_activations not in (None, True, False):
            raise ConfigError(f"use_cached_activations must be true or false, got {self.use_cached_activations!r}.")
        if self.use_cached_activations is False and self.activation_cache_path is not None:
            raise ConfigError("use_cached_activations is false but activation_cache_path names a cache to train "
                              "from; remove one of them.")
        if self.activation_cache_path is not None and self.cached_activations_path is not None:
            raise ConfigError("activation_cache_path and cached_activations_path name the same thing (the cache to "
                              "train from); set one of them.")
        if not isinstance(self.sweep, Mapping):
            raise ConfigError(f"sweep must map fields to lists of values, got {self.sweep!r}.")
        if not 1 <= len(self.seqpos_slice) <= 3:
            raise ConfigError(f"seqpos_slice must have 1 to 3 entries, got {list(self.seqpos_slice)}.")
        self._check_token_fields()

    def _check_transcoder(self) -> None:
        """hook_name_out goes with a transcoder (and a transcoder with it), one input hook, whole activations."""
        from jsae.saes.transcoder_training import TranscoderTrainingFields

        out = self.hook_name_out
        if out is not None and not isinstance(out, str):
            raise ConfigError(f"hook_name_out: expected a hook point name or null, got {out!r}.")
        if self.train is None:
            return
        transcoder, arch = isinstance(self.train.sae, TranscoderTrainingFields), self.train.sae.architecture
        if transcoder and out is None:
            raise ConfigError(f"sae.architecture: {arch!r} learns one hook's activations from another's: set "
                              "hook_name_out (the hook it produces; hook_name is the one it reads).")
        if out is not None and not transcoder:
            known = f"{arch}_transcoder" if arch in ("topk", "jumprelu") else "transcoder"
            raise ConfigError(f"hook_name_out: {out!r} is a transcoder's target, but sae.architecture is {arch!r}; "
                              f"use a transcoder architecture (e.g. {known!r}), or drop hook_name_out.")
        if out is not None and (self.hook_names is not None or self.hook_head_index is not None):
            raise ConfigError("hook_name_out: a transcoder reads one hook point (hook_name), whole: it takes neither "
                              "hook_names nor hook_head_index.")

    def _check_token_fields(self) -> None:
        """The fields that pick positions and token ids hold what they can mean; what depends on the
        model (the vocabulary, a hook's heads) is checked once it is loaded (bridge.data.check_token_settings,
        bridge.model.hook_width)."""
        seqpos = list(self.seqpos_slice)
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in seqpos):
            raise ConfigError("seqpos_slice: entries must be integers or null ([start, stop] or [start, stop, step], "
                              f"a Python slice of each row's positions), got {seqpos}.")
        if len(seqpos) == 3 and seqpos[2] == 0:
            raise ConfigError(f"seqpos_slice: {seqpos} has step 0; use a step of 1 or more (or null for every "
                              "position).")
        if not range(self.context_size)[slice(*seqpos)]:
            raise ConfigError(f"seqpos_slice: {seqpos} keeps no position of a row of context_size={self.context_size} "
                              f"tokens (positions 0 to {self.context_size - 1}); choose start and stop within the row.")
        excluded = self.exclude_special_tokens
        if not isinstance(excluded, bool) and (
                not isinstance(excluded, list | tuple)
                or any(isinstance(t, bool) or not isinstance(t, int) for t in excluded)):
            raise ConfigError(f"exclude_special_tokens: expected true, false or a list of token ids (integers), got "
                              f"{excluded!r}.")
        separator = self.sequence_separator_token
        if isinstance(separator, bool) or not (separator is None or isinstance(separator, int | str)):
            raise ConfigError(f"sequence_separator_token: expected a token id, 'bos', 'eos', 'sep' or null, got "
                              f"{separator!r}.")
        head = self.hook_head_index
        if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
            raise ConfigError(f"hook_head_index: expected a head number (an integer) or null, got {head!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> RunConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}.")
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"train"}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in data:
            if key not in run_fields | train_fields:
                raise ConfigError(
                    f"{where}: unknown key {key!r}." + close_names(str(key), run_fields | train_fields)
                )
        _check_numbers(data, {f.name: f.type for f in dataclasses.fields(TrainConfig)}, where)
        run = {k: v for k, v in data.items() if k in run_fields}
        train_data = {k: v for k, v in data.items() if k in train_fields}
        if data.get("autocast") is True:  # SAELens' autocast: the SAE's products in bfloat16
            if train_data.get("compute_dtype", "bfloat16") != "bfloat16":
                raise ConfigError(f"{where}: autocast: true runs the products in bfloat16, but compute_dtype is "
                                  f"{train_data['compute_dtype']!r}; drop one of them.")
            train_data["compute_dtype"] = "bfloat16"
        train = TrainConfig.from_dict(train_data, where=where)
        return cls(**run, train=train)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: config file not found.")
        try:
            data = load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); a "
                              "config file is YAML text.") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}).") from err
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}.")
        data = dict(data)
        for key, value in (overrides or {}).items():
            if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
                data[key] = dict(data[key]) | dict(value)
            else:
                data[key] = value
        return cls.from_dict(data, where=str(path))

    @property
    def activations_cache(self) -> str | None:
        """The activation cache this run trains from (activation_cache_path or cached_activations_path, or with
        use_cached_activations SAELens' default path: sae_lens/config.py, _default_cached_activations_path), or None."""
        if self.use_cached_activations is False:
            return None
        given = self.activation_cache_path if self.activation_cache_path is not None else self.cached_activations_path
        if given is not None or not self.use_cached_activations:
            return given
        path = f"activations/{self.dataset_path.replace('/', '_')}/{self.model_name.replace('/', '_')}/{self.hook_name}"
        return path if self.hook_head_index is None else f"{path}_{self.hook_head_index}"

    @property
    def hooks(self) -> list[str]:
        """The hook points this run trains SAEs on."""
        return list(self.hook_names) if self.hook_names else [self.hook_name]

    @property
    def read_hooks(self) -> list[str]:
        """The hook points one model forward reads: `hooks`, then a transcoder's hook_name_out (its target)."""
        return self.hooks + ([self.hook_name_out] if self.hook_name_out is not None else [])

    def metadata(self) -> dict[str, Any]:
        """What SAELens records in an SAE's metadata about where its activations came from."""
        return {
            "model_name": self.model_name,
            "model_class_name": self.model_class_name,
            "hook_name": self.hook_name,
            "hook_head_index": self.hook_head_index,
            "dataset_path": self.dataset_path,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "seqpos_slice": list(self.seqpos_slice),
            "exclude_special_tokens": self.exclude_special_tokens,
            "sequence_separator_token": self.sequence_separator_token,
            "disable_concat_sequences": self.disable_concat_sequences,
            "model_from_pretrained_kwargs": dict(self.model_from_pretrained_kwargs),
        } | ({"hook_name_out": self.hook_name_out} if self.hook_name_out is not None else {})

