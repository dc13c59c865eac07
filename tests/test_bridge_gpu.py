"""GPUs as a back end, checked on the CPU: where the model goes (device: auto), JAX's memory variables
when torch shares the GPU, the DLPack hand-off's device context, and where and in what dtype activations
are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


# ---------------------------------------------------------------------------------------- device: auto
@pytest.mark.parametrize("torch_has_cuda, platform, device", [
    (True, "gpu", "cuda"), (True, "cuda", "cuda"), (True, "cpu", "cpu"), (False, "cpu", "cpu"), (False, "gpu", "cpu"),
])
def test_auto_puts_the_model_on_cuda_only_where_torch_and_jax_both_have_a_gpu(torch_has_cuda, platform, device):
    from bridge.model import resolve_device

    resolved, warning = resolve_device("auto", torch_has_cuda, platform)
    assert resolved == device
    # the one case auto cannot avoid a crossing: JAX on a GPU, torch without CUDA
    assert (warning is not None) == (platform != "cpu" and not torch_has_cuda)


@pytest.mark.parametrize("requested, platform, crossing", [
    ("cuda", "cpu", True), ("cuda:1", "cpu", True), ("cpu", "gpu", True), ("cuda:1", "gpu", False), ("cpu", "cpu", False),
])
def test_a_model_and_jax_on_different_sides_warn_with_the_cost(requested, platform, crossing):
    from bridge.model import resolve_device

    resolved, warning = resolve_device(requested, True, platform)
    assert resolved == requested  # anything but auto is kept as written
    if crossing:
        assert "every batch" in warning and "copied" in warning
    else:
        assert warning is None


def test_run_config_and_eval_default_to_auto_which_is_the_cpu_here():
    import inspect

    import jax

    from bridge.cli import build_parser
    from bridge.eval_run import eval_run_config
    from bridge.model import model_device
    from bridge.run_config import RunConfig

    assert RunConfig().device == "auto"
    assert build_parser().parse_args(["eval", "some/sae"]).device == "auto"
    assert inspect.signature(eval_run_config).parameters["device"].default == "auto"
    expected = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    assert model_device("auto") == expected


def test_prepare_resolves_auto_before_loading_the_model(tmp_path):
    from bridge.run import prepare
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    cfg = RunConfig.from_yaml(DEFAULT_CONFIG, {"output_path": str(tmp_path / "sae"), "checkpoint_path": None,
                                               "n_eval_batches": 0, "sae": {"d_sae": 256, "k": 16}})
    model, prepared = prepare(cfg)
    assert prepared.device == "cpu" and str(model.cfg.device) == "cpu"


# ---------------------------------------------------------------------------------------- memory policy
def test_memory_policy_sets_on_demand_allocation_when_the_gpu_is_shared():
    from bridge.model import jax_memory_env

    assert jax_memory_env({}, True, None) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert jax_memory_env({}, True, 0.4) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.4"}
    assert jax_memory_env({}, False, None) == {}
    assert jax_memory_env({}, False, 0.4) == {}
    # the user's own setting of any of JAX's memory variables is left as it is
    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        assert jax_memory_env({name: "x"}, True, 0.4) == {}


def test_jax_platform_is_guessed_from_the_environment_and_the_plugin():
    from bridge.model import jax_would_use_gpu, lm_shares_gpu_with_jax

    assert jax_would_use_gpu({}, True) and not jax_would_use_gpu({}, False)
    assert not jax_would_use_gpu({"JAX_PLATFORMS": "cpu"}, True)
    assert jax_would_use_gpu({"JAX_PLATFORMS": "cuda,cpu"}, False)
    assert not jax_would_use_gpu({"JAX_PLATFORMS": "cpu,cuda"}, True)
    assert jax_would_use_gpu({"JAX_PLATFORM_NAME": "gpu"}, False)

    assert lm_shares_gpu_with_jax("auto", True, True)
    assert lm_shares_gpu_with_jax("cuda:1", True, True)
    assert not lm_shares_gpu_with_jax("auto", False, True)
    assert not lm_shares_gpu_with_jax("auto", True, False)
    assert not lm_shares_gpu_with_jax("cpu", True, True)
    assert not lm_shares_gpu_with_jax("cuda", True, False)


def test_memory_policy_applies_and_says_so_in_one_line(monkeypatch, capsys):
    import bridge.model as bm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bm, "jax_cuda_plugin_installed", lambda: True)
    env: dict = {}
    assert bm.apply_jax_memory_policy("auto", 0.5, env) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in err
    assert bm.apply_jax_memory_policy("auto", 0.5, env) == {}  # now the environment's own
    assert bm.apply_jax_memory_policy("cpu", None, {}) == {}
    assert capsys.readouterr().err == ""


def test_cli_decides_the_memory_policy_before_jax_starts():
    import subprocess
    import sys

    # a fresh process: JAX's backend has not started, and deciding (config, torch, environment) must not start it
    code = """
import bridge.cli as cli, bridge.model as bm, jax._src.xla_bridge as xb
seen = []
bm.apply_jax_memory_policy = lambda device, fraction, environ=None: seen.append((device, fraction)) or {}
cli._jax_memory_policy(cli.build_parser().parse_args(["train", "--set", "jax_memory_fraction=0.3"]))
cli._jax_memory_policy(cli.build_parser().parse_args(["eval", "x", "--device", "cuda:1"]))
print(seen, bool(xb._backends))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[('auto', 0.3), ('cuda:1', None)] False"


def test_jax_memory_fraction_is_checked():
    from bridge.run_config import RunConfig
    from jsae import ConfigError

    assert RunConfig(jax_memory_fraction=0.5).jax_memory_fraction == 0.5
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ConfigError, match="jax_memory_fraction"):
            RunConfig(jax_memory_fraction=bad)


# ---------------------------------------------------------------------------------------- DLPack
class _FakeTensor:
    def __init__(self, device):
        self.device = device


def test_hand_off_of_a_tensor_on_the_second_gpu_runs_with_that_gpu_current():
    import contextlib

    from bridge.dlpack import device_context

    ctx = device_context(_FakeTensor(torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(device_context(_FakeTensor(torch.device("cpu"))), contextlib.nullcontext)


def test_cpu_tensors_still_hand_over_without_a_copy():
    from bridge.dlpack import torch_to_jax

    for dtype in (torch.float32, torch.bfloat16):
        t = torch.empty((64, 32), dtype=dtype)
        t.copy_(torch.randn(64, 32))
        x = torch_to_jax(t)
        assert x.unsafe_buffer_pointer() == t.data_ptr()
        np.testing.assert_array_equal(np.asarray(x, dtype=np.float32), t.float().numpy())


def test_eval_hooks_enter_the_activation_device_context(monkeypatch):
    import jsae
    from bridge import evals, hooked_sae

    entered = []
    original = hooked_sae.device_context

    def spy(t):
        entered.append(t.device)
        return original(t)

    monkeypatch.setattr(hooked_sae, "device_context", spy)
    sae = jsae.SAE.from_config(jsae.TopKSAEConfig(d_in=16, d_sae=32, k=4), seed=0)
    acts = torch.randn(2, 3, 16)
    out = evals.sae_hook(sae)(acts)
    assert out.shape == acts.shape and out.device == acts.device
    assert entered == [acts.device]


# ---------------------------------------------------------------------------------------- activations
def test_store_placement():
    from bridge.activations import store_placement

    assert store_placement("with_model", "cuda:1") == (None, False)
    assert store_placement("cpu", "cuda:1") == ("cpu", True)
    assert store_placement("cpu", "cpu") == ("cpu", False)


def test_activation_settings_are_checked():
    from bridge.run_config import RunConfig
    from jsae import ConfigError

    with pytest.raises(ConfigError, match="act_store_device"):
        RunConfig(act_store_device="gpu")
    with pytest.raises(ConfigError, match="activations_dtype"):
        RunConfig(activations_dtype="float16")


def _small(tmp_path, **changes):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    data = {"total_training_tokens": 8192, "train_batch_size_tokens": 2048, "lr_decay_steps": 0,
            "n_batches_in_buffer": 2, "store_batch_size_prompts": 8, "checkpoint_path": None,
            "progress_bar": False, "n_eval_batches": 0, "output_path": str(tmp_path / "sae"),
            "sae": {"d_sae": 256, "k": 16}} | changes
    return RunConfig.from_yaml(DEFAULT_CONFIG, data)


@pytest.mark.parametrize("store", ["with_model", "cpu"])
def test_bfloat16_activations_train_through_the_run(tmp_path, monkeypatch, store):
    import jax.numpy as jnp

    import jsae
    from bridge.run import run

    seen = []
    fit = jsae.Trainer.fit

    def spy(self, batches, **kwargs):
        def watch():
            for batch in batches:
                seen.append(batch.dtype)
                yield batch

        seen.append(("batch_dtype", kwargs.get("batch_dtype")))
        return fit(self, watch(), **kwargs)

    monkeypatch.setattr(jsae.Trainer, "fit", spy)
    sae, summary = run(_small(tmp_path, activations_dtype="bfloat16", act_store_device=store))
    assert seen[0] == ("batch_dtype", "bfloat16")
    assert len(seen) > 1 and all(d == jnp.bfloat16 for d in seen[1:])
    assert all(np.isfinite(np.asarray(v, dtype=np.float32)).all() for v in sae.params.values())
    assert (tmp_path / "sae" / "cfg.json").is_file()


def test_cpu_store_on_a_cpu_model_serves_the_model_activations_in_the_dtype(tmp_path):
    from bridge.run import prepare
    from bridge.sources import activation_source

    cfg = _small(tmp_path, act_store_device="cpu", activations_dtype="bfloat16")
    model, cfg = prepare(cfg)
    source = activation_source(cfg, model)
    source.as_jax = False
    batch = next(iter(source.torch_batches()))
    assert batch.device.type == "cpu" and batch.dtype == torch.bfloat16 and batch.shape == (2048, 128)
    assert source.store_device == "cpu" and not source.buffer.pin_memory
