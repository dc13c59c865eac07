"""What training returns: the SAE as SAELens saves it, and a sweep's SAEs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jsae.backends import ExecutionPlan
from jsae.sae import SAE
from jsae.saes import TrainingArchitecture, get_architecture


@dataclasses.dataclass(frozen=True)
class SweepResult(Sequence):
    """The SAEs a sweep trained, in member order; `result["k=16"]` picks one by name."""

    names: tuple[str, ...]
    saes: tuple[SAE, ...]

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.saes[self.names.index(key)]
        return self.saes[key]

    def __len__(self) -> int:
        return len(self.saes)



def saved_sae(host_state, cfg, arch: TrainingArchitecture, plan: ExecutionPlan) -> SAE:
    """The SAE of a (host-side) TrainState as SAELens saves it: the expected_average_only_in input
    scale folded into W_enc, W_dec and b_dec (SAELens' fold_activation_norm_scaling_factor), then the
    architecture's saved form (`to_inference`), with SAELens' l0 and num_dead_features metadata and
    the execution plan under `jsae_execution`."""
    import jsae
    from jsae.training.step import feature_density, log_feature_sparsity

    sae_cfg = cfg.sae
    params = {k: np.asarray(v) for k, v in host_state.params.items()}
    inference_cfg = sae_cfg.inference_config()
    scale = 1.0
    if sae_cfg.normalize_activations == "expected_average_only_in":
        scale = float(host_state.scaling_factor)
        fold = get_architecture(inference_cfg.architecture).fold_activation_norm_scaling_factor
        params, inference_cfg = fold(params, inference_cfg, scale)
    params = arch.to_inference({k: jnp.asarray(v) for k, v in params.items()}, host_state.extra, sae_cfg, scale)
    params = {k: v.astype(inference_cfg.jnp_dtype) for k, v in params.items()}
    density = np.asarray(feature_density(host_state))
    dead = int(np.sum(np.asarray(host_state.steps_since_fired) > cfg.dead_feature_window))
    metadata = inference_cfg.metadata.replace(l0=float(density.sum()), num_dead_features=dead,
                                              jsae_version=jsae.__version__, jsae_execution=plan.to_dict())
    return SAE(inference_cfg.replace(metadata=metadata), params, np.asarray(log_feature_sparsity(host_state)))
