"""Converters: a released SAE's files, as its Hub repository stores them, into a jsae config + params.

One module per format family; `CONVERTERS` maps SAELens' conversion-func name (a registry
release's `conversion_func`; the keys of `NAMED_PRETRAINED_SAE_LOADERS` in
sae_lens/loading/pretrained_sae_loaders.py) to a function `convert(src: Source) -> Converted`.
`Source` gives the release, sae id, repo id, the registry `path` (`folder`), SAELens' cfg
overrides and the requested dtype, and downloads files (`src.file(name)` inside the folder,
`src.repo_file(path)` from the repository root). A converter returns params named and shaped as
SAELens' state dict after its own processing, so `jsae.SAE.from_pretrained` equals
`sae_lens.SAE.from_pretrained` tensor for tensor.

To add a format: write `convert_<name>(src)` in its family's module (or a new module here) and
add one line to `CONVERTERS`. A format jsae cannot express exactly raises `ConfigError` naming
the release (`unsupported`).
"""

from __future__ import annotations

from collections.abc import Callable

from jsae._errors import ConfigError, close_names
from jsae.converters import checkpoints, gemma, goodfire, llama_scope, saelens, temporal, transcoders
from jsae.converters._source import Converted, Source
from jsae.converters.folders import (
    GEMMA_SCOPE_FILENAME,
    SPARSIFY_WEIGHTS_FILENAME,
    read_gemma_scope,
    read_npz,
    read_sparsify,
)

Converter = Callable[[Source], Converted]

#: SAELens conversion-func name -> converter.
CONVERTERS: dict[str, Converter] = {
    "sae_lens": saelens.convert_sae_lens,
    "sparsify": saelens.convert_sparsify,
    "gemma_2": gemma.convert_gemma_2,
    "gemma_3": gemma.convert_gemma_3,
    "connor_rob_hook_z": checkpoints.convert_connor_rob_hook_z,
    "dictionary_learning_1": checkpoints.convert_dictionary_learning_1,
    "deepseek_r1": checkpoints.convert_deepseek_r1,
    "qwen_scope": checkpoints.convert_qwen_scope,
    "llama_scope": llama_scope.convert_llama_scope,
    "llama_scope_r1_distill": llama_scope.convert_llama_scope_r1_distill,
    "gemma_2_transcoder": transcoders.convert_gemma_2_transcoder,
    "mwhanna_transcoder": transcoders.convert_mwhanna_transcoder,
    "mntss_clt_layer_transcoder": transcoders.convert_mntss_clt_layer_transcoder,
    "temporal": temporal.convert_temporal,
    "goodfire": goodfire.convert_goodfire,
}

#: SAELens' conversion funcs (6.54.12), including those jsae does not convert.
SAELENS_CONVERSION_FUNCS = (
    "sae_lens",
    "connor_rob_hook_z",
    "gemma_2",
    "gemma_3",
    "llama_scope",
    "llama_scope_r1_distill",
    "dictionary_learning_1",
    "deepseek_r1",
    "qwen_scope",
    "sparsify",
    "gemma_2_transcoder",
    "mwhanna_transcoder",
    "mntss_clt_layer_transcoder",
    "temporal",
    "goodfire",
)


def unsupported(src: Source, what: str) -> ConfigError:
    """The error for a release whose files jsae cannot express exactly (`what` says why)."""
    return ConfigError(f"release {src.release!r}, sae_id {src.sae_id!r} ({src.repo_id}/{src.folder}): {what}")


def get_converter(name: str, *, release: str) -> Converter:
    """The converter for SAELens conversion func `name`; ConfigError naming the release otherwise."""
    if name in CONVERTERS:
        return CONVERTERS[name]
    if name in SAELENS_CONVERSION_FUNCS:
        raise ConfigError(
            f"release {release!r} needs SAELens' {name!r} converter, which jsae does not implement "
            f"(jsae converts {sorted(CONVERTERS)})."
        )
    raise ConfigError(
        f"release {release!r}: unknown conversion_func {name!r}; jsae converts {sorted(CONVERTERS)}."
        + close_names(name, list(CONVERTERS))
    )


__all__ = [
    "CONVERTERS",
    "GEMMA_SCOPE_FILENAME",
    "SAELENS_CONVERSION_FUNCS",
    "SPARSIFY_WEIGHTS_FILENAME",
    "Converted",
    "Converter",
    "Source",
    "get_converter",
    "read_gemma_scope",
    "read_npz",
    "read_sparsify",
    "unsupported",
]
