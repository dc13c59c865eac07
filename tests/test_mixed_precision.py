"""Mixed precision: compute_dtype bfloat16 products with float32 accumulation, matmul_precision, the plan
that records them, and SAELens' autocast / autocast_lm runner fields."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsae
from jsae.backends.precision import mixed_dot
from jsae.training.step import init_train_state, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

D_IN, D_SAE, N = 16, 256, 64
DOT = re.compile(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def sae_config(arch: str, **changes):
    if arch.startswith("topk"):
        impl = arch.split("-")[1]
        return jsae.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_implementation=impl, **changes)
    if arch == "jumprelu":
        return jsae.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **changes)
    return jsae.StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **changes)


def train_config(arch: str, **changes) -> jsae.TrainConfig:
    return jsae.TrainConfig(sae=sae_config(arch), total_training_tokens=10 * N, train_batch_size_tokens=N,
                            dead_feature_window=1, progress_bar=False, **changes)


def step_dots(cfg: jsae.TrainConfig) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) tensor types of every dot in the lowered training step."""
    step = make_train_step(cfg, plan=jsae.resolve_plan(cfg))
    text = jax.jit(step).lower(init_train_state(cfg), jnp.ones((N, D_IN))).as_text()
    return [m.groups() for m in DOT.finditer(text)]


def is_matrix(tensor_type: str) -> bool:
    return tensor_type.count("x") >= 2  # rank 2 or more: tensor<64x16xbf16>


@pytest.mark.parametrize("arch", ["topk-dense", "topk-sparse", "standard", "jumprelu"])
def test_bfloat16_compute_runs_every_matrix_product_on_bf16_inputs_into_float32(arch):
    # dead_feature_window=1 with a fresh state: the aux-k branches are traced too (they are in the
    # program either way, behind lax.cond)
    dots = step_dots(train_config(arch, compute_dtype="bfloat16"))
    matrices = [d for d in dots if is_matrix(d[0]) and is_matrix(d[1])]
    # forward and backward: at least the encoder and decoder products and their transposes
    assert len(matrices) >= 4
    for lhs, rhs, out in matrices:
        assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>") and out.endswith("xf32>"), (lhs, rhs, out)
    # and float32 compute keeps every product in float32
    for lhs, rhs, out in step_dots(train_config(arch)):
        assert "bf16" not in lhs + rhs + out


def test_mixed_dot_is_the_bf16_product_accumulated_in_float32_forward_and_backward():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(k1, (32, 64)), jax.random.normal(k2, (64, 8))
    g = jax.random.normal(k3, (32, 8))
    bf = jnp.bfloat16

    def ref(x, y):
        return jax.lax.dot_general(x.astype(bf), y.astype(bf), (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    out, vjp = jax.vjp(lambda x, y: mixed_dot(x, y, bf), a, b)
    np.testing.assert_array_equal(out, ref(a, b))
    assert out.dtype == jnp.float32
    d_a, d_b = vjp(g)
    np.testing.assert_array_equal(d_a, ref(g, b.T))
    np.testing.assert_array_equal(d_b, ref(a.T, g))
    assert d_a.dtype == d_b.dtype == jnp.float32
    # the rounding is real: the float32 product differs
    assert float(jnp.max(jnp.abs(out - a @ b))) > 1e-4
    # a vector operand (b_dec's shift through the encoder)
    v, vjp = jax.vjp(lambda x, y: mixed_dot(x, y, bf), a[0], b)
    np.testing.assert_array_equal(v, ref(a[0], b))
    d_v, d_b = vjp(g[0])
    np.testing.assert_array_equal(d_v, ref(g[0], b.T))
    np.testing.assert_array_equal(d_b, ref(a[0][:, None], g[0][None]))


@pytest.mark.parametrize("arch", ["topk-dense", "standard"])
def test_bfloat16_step_stays_close_to_float32_and_keeps_float32_state(arch):
    cfg32 = train_config(arch)
    cfg16 = train_config(arch, compute_dtype="bfloat16")
    batch = jax.random.normal(jax.random.key(1), (N, D_IN))
    states = {}
    for name, cfg in (("f32", cfg32), ("bf16", cfg16)):
        state, metrics = jax.jit(make_train_step(cfg))(init_train_state(cfg), batch)
        states[name] = (state, metrics)
    (_, m32), (s16, m16) = states["f32"], states["bf16"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(s16.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(s16.opt_state) if hasattr(leaf, "dtype")
               and jnp.issubdtype(leaf.dtype, jnp.floating))
    loss32, loss16 = float(m32["losses/overall_loss"]), float(m16["losses/overall_loss"])
    assert loss16 == pytest.approx(loss32, rel=3e-2) and loss16 != loss32


def test_plan_records_compute_dtype_and_matmul_precision_and_leaves_the_float32_kernels(tmp_path):
    from tests.train_helpers import activation_batches

    sae = jsae.TopKTrainingSAEConfig(d_in=128, d_sae=1024, k=8, topk_implementation="sparse")
    cfg = jsae.TrainConfig(sae=sae, total_training_tokens=2 * 256, train_batch_size_tokens=256,
                           output_path=str(tmp_path / "sae"), progress_bar=False, n_devices=1,
                           compute_dtype="bfloat16", matmul_precision="highest")
    plan = jsae.resolve_plan(cfg)
    assert (plan.compute_dtype, plan.matmul_precision) == ("bfloat16", "float32")
    assert (plan.sparse_products, plan.encoder_product, plan.encoder_screen) == ("xla", "xla", False)
    assert "compute_dtype bfloat16" in plan.describe() and "matmul_precision float32" in plan.describe()
    assert plan.ops().compute_dtype == "bfloat16"
    dense = jsae.resolve_plan(cfg.replace(sae=jsae.StandardTrainingSAEConfig(d_in=128, d_sae=1024)))
    assert dense.dense_step == "xla"
    gpu = jsae.resolve_plan(cfg, platform="gpu")
    assert (gpu.compute_dtype, gpu.matmul_precision, gpu.ops().compute_dtype) == ("bfloat16", "float32", "bfloat16")
    default = jsae.resolve_plan(cfg.replace(compute_dtype="float32", matmul_precision="default"))
    assert (default.compute_dtype, default.matmul_precision) == ("float32", "default")
    assert "compute_dtype" not in default.describe()

    trainer = jsae.Trainer(cfg)
    trainer.fit(iter(activation_batches(2, 256, 128)))
    recorded = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["jsae_execution"]
    assert recorded["compute_dtype"] == "bfloat16" and recorded["matmul_precision"] == "float32"


def test_matmul_precision_reaches_the_float32_products():
    for setting, hlo in (("float32", "HIGHEST"), ("highest", "HIGHEST"), ("tf32", "HIGH")):
        cfg = train_config("topk-dense", matmul_precision=setting)
        step = make_train_step(cfg, plan=jsae.resolve_plan(cfg))
        text = jax.jit(step).lower(init_train_state(cfg), jnp.ones((N, D_IN))).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert dots and all(f"precision = [{hlo}, {hlo}]" in line for line in dots), setting
    cfg = train_config("topk-dense")
    text = jax.jit(make_train_step(cfg)).lower(init_train_state(cfg), jnp.ones((N, D_IN))).as_text()
    assert "HIGHEST" not in text


def test_bad_mixed_precision_settings_are_config_errors():
    with pytest.raises(jsae.ConfigError, match="compute_dtype must be one of"):
        train_config("standard", compute_dtype="float16")
    with pytest.raises(jsae.ConfigError, match="matmul_precision must be one of"):
        train_config("standard", matmul_precision="bf16")
    gated = jsae.GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    with pytest.raises(jsae.ConfigError, match="compute_dtype='bfloat16': architecture 'gated'"):
        jsae.TrainConfig(sae=gated, total_training_tokens=N, train_batch_size_tokens=N, compute_dtype="bfloat16")


# --------------------------------------------------------------------------- SAELens' runner fields
def run_config(**changes):
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    return RunConfig.from_yaml(DEFAULT_CONFIG, changes)


def test_saelens_autocast_maps_onto_compute_dtype_bfloat16():
    assert run_config().train.compute_dtype == "float32"
    cfg = run_config(autocast=True)
    assert cfg.autocast and cfg.train.compute_dtype == "bfloat16"
    assert run_config(autocast=True, compute_dtype="bfloat16").train.compute_dtype == "bfloat16"
    assert run_config(compute_dtype="bfloat16").train.compute_dtype == "bfloat16"
    with pytest.raises(jsae.ConfigError, match="autocast: true runs the products in bfloat16"):
        run_config(autocast=True, compute_dtype="float32")
    with pytest.raises(jsae.ConfigError, match="autocast_lm must be true or false"):
        run_config(autocast_lm="yes")
    # the names are sae_lens' runner fields
    import sae_lens

    fields = sae_lens.LanguageModelSAERunnerConfig.__dataclass_fields__
    assert "autocast" in fields and "autocast_lm" in fields


def test_autocast_lm_runs_the_model_under_torch_autocast():
    import torch

    from bridge.activations import ActivationSource
    from bridge.model import load_model

    model = load_model("embedded", device="cpu")
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 32))

    def activations(autocast_lm: bool) -> torch.Tensor:
        source = ActivationSource(model, "blocks.2.hook_resid_pre", iter([]), batch_size=32, context_size=32,
                                  as_jax=False, fused_forward=False, autocast_lm=autocast_lm)
        return source.model_activations(tokens)

    plain, autocast = activations(False), activations(True)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.2.hook_resid_pre"], prepend_bos=False)
    expected = cache["blocks.2.hook_resid_pre"].reshape(-1, model.cfg.d_model).float()
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, expected, rtol=0, atol=0)
    assert not torch.equal(autocast, plain)
    torch.testing.assert_close(autocast, plain, rtol=0.1, atol=0.1)


@pytest.mark.slow
def test_bfloat16_compute_trains_the_default_run_as_well_as_float32(tmp_path):
    """configs/default.yaml (embedded model, TopK) on a reduced budget: bfloat16 products reach the
    float32 run's explained variance within 0.01."""
    from bridge.run import run

    budget = {"total_training_tokens": 409600, "checkpoint_path": None, "progress_bar": False,
              "eval_every_n_steps": 0, "lr_decay_steps": 20}
    evs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = run_config(**budget, compute_dtype=dtype, output_path=str(tmp_path / dtype))
        _, summary = run(cfg)
        evs[dtype] = summary["explained_variance"]
    print(f"explained variance at {budget['total_training_tokens']} tokens: {evs}")
    assert evs["float32"] > 0.5
    assert abs(evs["bfloat16"] - evs["float32"]) < 0.01, evs


def test_bfloat16_sparse_step_runs_under_shard_map():
    # the reference gathers' and scatters' loops under jsae's shard_map driver (bfloat16 takes them on CPU)
    from jax.sharding import Mesh, PartitionSpec

    cfg = train_config("topk-sparse", compute_dtype="bfloat16")
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    step = make_train_step(cfg, "data", plan=jsae.resolve_plan(cfg))
    sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("data")),
                                    out_specs=(PartitionSpec(), PartitionSpec())))
    _, metrics = sharded(init_train_state(cfg), jax.random.normal(jax.random.key(2), (N, D_IN)))
    assert np.isfinite(float(metrics["losses/overall_loss"]))
