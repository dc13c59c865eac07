"""The probe table of bench/probes.py: bad inputs, corrupt files and signals a careless or hostile user
could give `jsae train`, `jsae eval`, the Python API and SAE loading, each with how its outcome is judged.

A probe is data: a name, a kind, its command line (or, for python_api, a few lines run against jsae), the
files it needs (`setup`: a mutated SAE folder, a damaged token file, a config file's text), an optional
signal sent when a file appears, and `expect`:
  "error"  the input is wrong: a jsae error naming `names` is right, exit 0 is a silent wrong result;
  "ok"     the input is valid: the run must finish and pass `check`;
  "any"    either a clear error or a run that passes `check`;
  "resume" a signal interrupts the run, which is then rerun until it finishes: its SAE must equal the
           uninterrupted run's (the reference) and completed checkpoints must survive the interruption.

The config-field probes are generated from the fields of RunConfig, TrainConfig and TopKTrainingSAEConfig.
"""

from __future__ import annotations

import dataclasses

KINDS = ("cli_train", "cli_eval", "cli_other", "python_api", "load")


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    kind: str
    argv: tuple = ()          # jsae arguments; {dir} is the probe's folder, {assets} the shared one
    code: str = ""            # python_api / load: statements run with jsae, np, D (probe folder), A (assets)
    setup: tuple = ()         # (("tokens", variant, filename) | ("sae", mutation) | ("file", name, text)), ...
    expect: str = "error"
    names: tuple = ()         # what a clear error message names (case-insensitive substrings)
    check: str = ""           # "finite_sae" | "equal_ref" | "json_finite" | "" (python_api checks itself)
    signal: tuple = ()        # (signal name, glob under {dir} that triggers it, delay seconds)
    resume_argv: tuple = ()   # the rerun after an interruption (default: argv without the signal)


TINY = {  # the base of every train probe: the embedded model, 32-token rows, a TopK 128 -> 256 SAE
    "model_name": "embedded", "hook_name": "blocks.0.hook_resid_pre", "dataset_path": "stdlib",
    "context_size": 32, "store_batch_size_prompts": 4, "n_batches_in_buffer": 4,
    "sae": {"architecture": "topk", "d_in": 128, "d_sae": 256, "k": 8},
    "total_training_tokens": 2048, "train_batch_size_tokens": 256, "lr": 0.001, "n_eval_batches": 0,
    "seed": 1, "progress_bar": False,
}
TRAIN = ("train", "{assets}/tiny.yaml", "--output-path", "{dir}/sae")
DRY = TRAIN + ("--dry-run",)
# the run the signal probes interrupt: 64 steps, a checkpoint every 8
LONG = TRAIN + ("--set", "total_training_tokens=16384", "--set", "checkpoint_path={dir}/ckpt",
                "--set", "checkpoint_every_n_steps=8", "--set", "log_every_n_steps=1")

ENUMS = {"lr_scheduler_name", "on_nonfinite", "sweep_strategy", "adam_implementation", "compute_dtype",
         "matmul_precision", "act_store_device", "activations_dtype", "device", "model_class_name",
         "architecture", "dtype", "normalize_activations", "reshape_activations", "topk_implementation"}
# fields whose value is a name or a path: only a wrong type is surely wrong
SKIP = {"train", "sae", "metadata", "seed", "run_name", "dataset_split", "wandb_project"}


def _bad_values(kind: str, name: str) -> list[tuple[str, str]]:
    """(label, YAML value) pairs that are wrong for a field of this type."""
    if name in ENUMS:
        return [("enum", "bogus_value"), ("type", "[1, 2]")]
    if kind.startswith("bool"):
        return [("type", "maybe"), ("int", "2")]
    if kind.startswith("int"):
        return [("type", "abc"), ("negative", "-1")]
    if kind.startswith("float"):
        return [("type", "abc"), ("nan", ".nan")]
    if kind.startswith("str"):
        return [("type", "[1, 2]")]
    if kind.startswith(("dict", "list", "tuple")):
        return [("type", "7")]
    return [("type", "{a: 1}")]


def field_probes() -> list[Probe]:
    """One probe per (field, wrong value) of the run config, the training config and the SAE config, through
    `jsae train --dry-run`: every wrong value must be refused naming its field."""
    import jsae
    from bridge.run_config import RunConfig

    out = []
    sections = [("run", "", RunConfig), ("train", "", jsae.TrainConfig), ("sae", "sae.", jsae.TopKTrainingSAEConfig)]
    seen = set()
    for section, prefix, cls in sections:
        for field in dataclasses.fields(cls):
            if field.name in SKIP or (prefix + field.name) in seen:
                continue
            seen.add(prefix + field.name)
            for label, value in _bad_values(str(field.type), field.name):
                if field.name == "lr_end" and label == "negative":
                    continue
                base = ("train", "{assets}/tiny.yaml", "--dry-run") if field.name == "output_path" else DRY
                out.append(Probe(f"field:{section}.{field.name}={label}", "cli_train",  # --output-path would win
                                 base + ("--set", f"{prefix}{field.name}={value}"), names=(field.name,)))
    return out


def _yaml(text: str) -> tuple:
    return (("file", "run.yaml", text),)


BASE_YAML = "\n".join(f"{k}: {v}" for k, v in TINY.items() if k != "sae") + \
    "\nsae: {architecture: topk, d_in: 128, d_sae: 256, k: 8}\n"
RUN = ("train", "{dir}/run.yaml", "--output-path", "{dir}/sae", "--dry-run")

YAML_PROBES = [
    Probe("yaml:valid_base", "cli_train", RUN, setup=_yaml(BASE_YAML), expect="ok"),
    Probe("yaml:duplicate_key", "cli_train", RUN, setup=_yaml(BASE_YAML + "lr: 0.5\n"), names=("lr",)),
    Probe("yaml:tab_indent", "cli_train", RUN, setup=_yaml(BASE_YAML + "sae:\n\tk: 4\n"), names=("run.yaml",)),
    Probe("yaml:a_list", "cli_train", RUN, setup=_yaml("- lr: 1\n"), names=("run.yaml",)),
    Probe("yaml:a_scalar", "cli_train", RUN, setup=_yaml("hello\n"), names=("run.yaml",)),
    Probe("yaml:empty_file", "cli_train", RUN, setup=_yaml(""), expect="any"),
    Probe("yaml:unknown_key", "cli_train", RUN, setup=_yaml(BASE_YAML + "lrr: 0.1\n"), names=("lrr",)),
    Probe("yaml:unknown_sae_key", "cli_train", RUN, setup=_yaml(BASE_YAML.replace("k: 8}", "kk: 8}")),
          names=("kk",)),
    Probe("yaml:sae_null", "cli_train", RUN, setup=_yaml(BASE_YAML.split("sae: {")[0] + "sae: null\n"),
          names=("sae",)),
    Probe("yaml:sae_scalar", "cli_train", RUN, setup=_yaml(BASE_YAML.split("sae: {")[0] + "sae: 5\n"),
          names=("sae",)),
    Probe("yaml:quoted_float", "cli_train", RUN, setup=_yaml(BASE_YAML + "lr: '0.001'\n"), names=("lr",)),
    Probe("yaml:binary_garbage", "cli_train", RUN, setup=(("bytes", "run.yaml", "ff00fe9a0a0b"),),
          names=("run.yaml",)),
    Probe("yaml:merge_key_ok", "cli_train", RUN, expect="ok", setup=_yaml(BASE_YAML.replace(
        "sae: {architecture: topk, d_in: 128,", "sae: {<<: {architecture: topk, d_in: 128},"))),
    Probe("yaml:python_tag", "cli_train", RUN, setup=_yaml(BASE_YAML + "lr: !!python/object:os.system x\n"),
          names=("run.yaml",)),
    Probe("yaml:config_missing", "cli_train", ("train", "{dir}/none.yaml", "--dry-run"), names=("none.yaml",)),
    Probe("yaml:config_is_dir", "cli_train", ("train", "{dir}", "--dry-run"), names=("",)),
    Probe("cli:set_without_equals", "cli_train", DRY + ("--set", "lr"), names=("lr",)),
    Probe("cli:set_into_scalar", "cli_train", DRY + ("--set", "lr.x=1"), names=("lr",)),
    Probe("cli:set_unknown_nested", "cli_train", DRY + ("--set", "sae.bogus=1"), names=("bogus",)),
    Probe("cli:set_bad_yaml", "cli_train", DRY + ("--set", "lr=[1,"), names=("lr",)),
    Probe("cli:hex_int_ok", "cli_train", DRY + ("--set", "sae.d_sae=0x100"), expect="ok"),
    Probe("cli:k_above_d_sae", "cli_train", DRY + ("--set", "sae.k=300"), names=("k",)),
    Probe("cli:d_in_not_hook_width", "cli_train", DRY + ("--set", "sae.d_in=64"), names=("d_in",)),
    Probe("cli:tokens_below_one_batch", "cli_train", DRY + ("--set", "total_training_tokens=100"),
          names=("total_training_tokens",)),
    Probe("cli:batch_not_multiple_of_context", "cli_train", TRAIN + ("--set", "train_batch_size_tokens=100"),
          expect="any", check="finite_sae"),
    Probe("cli:context_above_n_ctx", "cli_train", DRY + ("--set", "context_size=100000"), names=("context_size",)),
    Probe("cli:hook_unknown", "cli_train", DRY + ("--set", "hook_name=blocks.99.hook_resid_pre"), names=("hook",)),
    Probe("cli:unknown_command", "cli_other", ("trian",), names=("trian",)),
    Probe("cli:eval_no_args", "cli_other", ("eval",), names=("sae_dir",)),
]

PATH_PROBES = [
    Probe("path:output_under_a_file", "cli_train", ("train", "{assets}/tiny.yaml", "--output-path",
          "{assets}/tiny.yaml/sae"), names=("output_path",)),
    Probe("path:output_is_a_file", "cli_train", ("train", "{assets}/tiny.yaml", "--output-path", "{assets}/tiny.yaml"),
          names=("output_path",)),
    Probe("path:checkpoint_under_a_file", "cli_train", TRAIN + ("--set", "checkpoint_path={assets}/tiny.yaml/c"),
          names=("checkpoint_path",)),
    Probe("path:log_under_a_file", "cli_train", TRAIN + ("--set", "log_path={assets}/tiny.yaml/log.jsonl"),
          names=("log_path",)),
    Probe("path:dataset_missing", "cli_train", DRY + ("--set", "dataset_path={dir}/nope.txt"), names=("nope.txt",)),
    Probe("path:dataset_empty_dir", "cli_train", DRY + ("--set", "dataset_path={assets}/empty_dir"),
          names=("dataset_path",)),
    Probe("path:cache_missing", "cli_train", TRAIN + ("--set", "activation_cache_path={dir}/nocache"),
          names=("nocache",)),
    Probe("path:output_in_proc", "cli_train", ("train", "{assets}/tiny.yaml", "--output-path", "/proc/jsae_sae"),
          names=("output_path",)),
]

# dataset_path files with token data problems (written by the harness's "tokens" setup)
TOKEN_VARIANTS = {
    "negative.npy": ("negative",), "float.npy": ("float",), "oov.npy": ("99999",), "empty.npy": ("empty",),
    "one_d.npy": ("2-D",), "three_d.npy": ("2-D",), "truncated.npy": ("truncated.npy",), "short_rows.npy": ("context_size",),
    "object.npy": ("object.npy",), "bool.npy": ("bool",), "empty.txt": ("empty.txt",),
    "whitespace.txt": ("whitespace.txt",), "garbage.txt": ("", "ok"), "bad.jsonl": ("bad.jsonl",),
    "no_text.jsonl": ("text",), "ids_oov.jsonl": ("99999",), "no_text.csv": ("text",),
    "integral_float.npy": ("", "ok"), "valid.npy": ("", "ok"),
}


def token_probes() -> list[Probe]:
    out = []
    for filename, spec in TOKEN_VARIANTS.items():
        argv = TRAIN + ("--set", f"dataset_path={{dir}}/{filename}")
        ok = spec[-1] == "ok"
        out.append(Probe(f"tokens:{filename}", "cli_train", argv, setup=(("tokens", filename),),
                         expect="any" if ok else "error", names=() if ok else (spec[0],),
                         check="finite_sae" if ok else ""))
    return out


SIGNAL_PROBES = [
    Probe(f"signal:{sig}_{when}", "cli_train", LONG + extra, expect="resume", signal=(sig, glob, delay))
    for sig in ("SIGINT", "SIGTERM", "SIGKILL")
    for when, glob, delay, extra in (
        ("mid_training", "ckpt/16", 0.0, ()),
        ("checkpoint_write", "ckpt/*orbax-checkpoint-tmp*", 0.0, ()),
        ("final_eval", "ckpt/64", 0.5, ("--set", "n_eval_batches=3")),
    )
] + [
    Probe("signal:SIGKILL_final_save", "cli_train", LONG, expect="resume", signal=("SIGKILL", "sae*", 0.0)),
    Probe("signal:SIGKILL_first_step", "cli_train", LONG, expect="resume", signal=("SIGKILL", "ckpt", 0.0)),
]

RESUME_PROBES = [
    Probe(f"resume:changed_{field}", "cli_train", LONG, expect="error", names=(label,),
          signal=("SIGKILL", "ckpt/16", 0.0), resume_argv=LONG + ("--set", f"{field}={value}"))
    for field, value, label in (("lr", "0.002", "lr"), ("sae.k", "4", "k"), ("seed", "2", "seed"),
                                ("context_size", "16", "context_size"), ("hook_name", "blocks.1.hook_resid_pre",
                                                                         "hook_name"),
                                ("dataset_path", "{assets}/valid.npy", "dataset_path"),
                                ("sae.architecture", "batchtopk", "architecture"))
] + [
    Probe("resume:changed_log_every_ok", "cli_train", LONG, expect="resume", signal=("SIGKILL", "ckpt/16", 0.0),
          resume_argv=LONG + ("--set", "log_every_n_steps=3")),
    Probe("resume:false_with_checkpoints", "cli_train", LONG, expect="error", names=("resume",),
          signal=("SIGKILL", "ckpt/16", 0.0), resume_argv=LONG + ("--set", "resume=false")),
]

EVAL = ("eval", "{assets}/eval_sae", "--batches", "2", "--batch-size", "2", "--json")
EVAL_PROBES = [
    Probe("eval:valid", "cli_eval", EVAL, expect="ok", check="json_finite"),
    Probe("eval:batches_zero", "cli_eval", EVAL + ("--batches", "0"), names=("batches",)),
    Probe("eval:batches_negative", "cli_eval", EVAL + ("--batches", "-3"), names=("batches",)),
    Probe("eval:batch_size_zero", "cli_eval", EVAL + ("--batch-size", "0"), names=("batch",)),
    Probe("eval:context_zero", "cli_eval", EVAL + ("--context-size", "0"), names=("context",)),
    Probe("eval:context_huge", "cli_eval", EVAL + ("--context-size", "100000"), names=("context",)),
    Probe("eval:hook_unknown", "cli_eval", EVAL + ("--hook", "blocks.9.nope"), names=("hook",)),
    Probe("eval:hook_other_width", "cli_eval", EVAL + ("--hook", "blocks.0.attn.hook_z"), names=("d_in",)),
    Probe("eval:model_unknown", "cli_eval", EVAL + ("--model", "no-such-model-xyz"), names=("no-such-model-xyz",)),
    Probe("eval:dataset_missing", "cli_eval", EVAL + ("--dataset", "{dir}/none.txt"), names=("none.txt",)),
    Probe("eval:device_cuda", "cli_eval", EVAL + ("--device", "cuda"), names=("cuda",)),
    Probe("eval:device_bogus", "cli_eval", EVAL + ("--device", "tpu9"), names=("device",)),
    Probe("eval:sae_dir_missing", "cli_eval", ("eval", "{dir}/none"), names=("none",)),
    Probe("eval:nan_weights", "cli_eval", ("eval", "{dir}/sae", "--batches", "1"), setup=(("sae", "nan", "eval"),),
          names=("not finite", "W_dec")),
    Probe("eval:batches_not_int", "cli_eval", EVAL + ("--batches", "two"), names=("batches",)),
]

# SAE folder mutations (the harness's "sae" setup): cfg.json fields, safetensors bytes, npz
SAE_MUTATIONS = {
    "cfg:d_in_string": ("d_in",), "cfg:d_sae_zero": ("d_sae",), "cfg:k_zero": ("k",), "cfg:k_above_d_sae": ("k",),
    "cfg:k_float": ("k",), "cfg:architecture_bogus": ("architecture",), "cfg:dtype_bogus": ("dtype",),
    "cfg:missing_d_in": ("d_in",), "cfg:empty": ("cfg.json",), "cfg:a_list": ("cfg.json",),
    "cfg:not_utf8": ("cfg.json",), "cfg:d_in_bool": ("d_in",), "cfg:d_sae_huge": ("d_sae",),
    "cfg:normalize_bogus": ("normalize_activations",), "cfg:metadata_list": ("metadata",),
    "cfg:extra_field": ("", "any"), "cfg:nan_scaling": ("", "any"), "cfg:d_in_negative": ("d_in",),
    "w:truncated": ("sae_weights.safetensors",), "w:header_garbage": ("sae_weights.safetensors",),
    "w:header_huge": ("sae_weights.safetensors",), "w:empty": ("sae_weights.safetensors",),
    "w:nan": ("", "any"), "w:inf": ("", "any"), "w:shape": ("W_dec",), "w:extra_tensor": ("W_enc_x",),
    "w:missing_tensor": ("b_enc",), "w:int_dtype": ("dtype",), "w:is_a_dir": ("sae_weights.safetensors",),
    "w:missing": ("sae_weights.safetensors",), "w:offsets_overlap": ("sae_weights.safetensors",),
    "w:float16": ("", "any"), "npz:truncated": ("params.npz",), "npz:garbage": ("params.npz",),
    "npz:missing_key": ("", "any"), "cfg:missing": ("cfg.json",), "folder:is_a_file": ("sae",),
}
LOAD = """
sae = jsae.SAE.load_from_disk(str(D / "sae"))
x = np.random.default_rng(0).normal(size=(8, sae.cfg.d_in)).astype(np.float32)
out = np.asarray(sae.decode(sae.encode(x)))
if not np.isfinite(out).all():
    print("WRONG: the loaded SAE gives non-finite outputs")
"""


def load_probes() -> list[Probe]:
    out = []
    for mutation, spec in SAE_MUTATIONS.items():
        ok = spec[-1] == "any"
        out.append(Probe(f"load:{mutation}", "load", code=LOAD, setup=(("sae", mutation),),
                         expect="any" if ok else "error", names=() if ok else (spec[0],)))
    return out


from probe_api import API_PROBES  # noqa: E402  (the python_api probes, in their own file)


def all_probes() -> list[Probe]:
    probes = (field_probes() + YAML_PROBES + PATH_PROBES + token_probes() + SIGNAL_PROBES + RESUME_PROBES
              + EVAL_PROBES + load_probes() + API_PROBES)
    names = [p.name for p in probes]
    assert len(names) == len(set(names)), "probe names must be unique"
    return probes
