"""Side-by-side training-step benchmark: jsae vs sae_lens on identical work, in one process.

For each case (architecture, d_in, d_sae, tokens per batch, dtype) it times one full training
step — forward, backward, gradient clipping, Adam — alternating the two libraries, and reports
tokens/s, the ratio, and the share of the measured matmul ceiling under the FLOP model below.

FLOP model (dense step): 12 * tokens * d_in * d_sae — encoder and decoder products forward
(2 + 2) and their backward (4 + 4). Elementwise work, top-k and Adam are not counted. sae_lens
performs all 12; jsae's dense step performs 10: the encoder's backward needs only the W_enc
gradient, because b_dec's gradient through the input is taken as (sum over tokens of dh) W_enc^T
(jsae.saes._base.training_hidden_pre) instead of a per-token product; each library's share of
the ceiling counts the products it performs. On CPU in float32 jsae's dense standard and JumpReLU
steps run those products on jsae's dense kernels (a BLAS sgemm, jsae.backends.cpu.kernels.dense_encode
/ dense_backward: the execution plan's dense_step "cpu_fused"; rows "dense, BLAS kernels"); `--xla`
also times them on XLA's products.
The ceiling of a dtype is the best n³ rate measured here of JAX, PyTorch and (CPU) the sgemm of
jsae's dense kernels called as they call it. The machine's rate drifts over minutes on a shared
VM (bench/RESULTS.md), so the ceiling's products are timed again among each case's steps, in the
same rotation, and a row's shares are of the best median rate reached there ("ceiling
alongside"). Rows on the dense kernels also time the kernels' products alone (dense_encode then
dense_backward on the step's operands: the same 10 products and the elementwise work between
them, without the losses, the clipping and Adam), alternated with the steps, and show that share too.
jsae's sparse TopK step (TopKTrainingSAEConfig.topk_implementation; "auto" takes it on CPU when
d_sae / k is large enough, see jsae.resolve_plan: the plan's topk "sparse") is counted as its one
dense product, the encoder forward (2 * tokens * d_in * d_sae), plus 2 * tokens * k * d_in for
each of its four products over the k active latents per token (decoder forward; backward: the
activations' gradient, the W_dec and the W_enc gradients): 2 * tokens * d_in * d_sae +
8 * tokens * k * d_in. Its share of the ceiling uses that count.
On a CPU with AMX tiles, float32, the sparse step has no dense float32 product at all: its top-k
is screened by a bf16 encoder product on the tiles, with a rigorous bound on that product's
error, and only the candidates (a few k a token) get float32 dot products
(jsae.backends.cpu.kernels.encoder_top_k, from d_sae 4096 on: the plan's encoder_screen). Those
rows read "sparse, screened" and show no share of the float32 ceiling, which would mean nothing
for bf16 tile work.

    python bench/bench.py                       # CPU, the default cases, both libraries
    python bench/bench.py --xla                 # ... and jsae's dense steps on XLA's products too
    python bench/bench.py --cases topk --dense-topk   # TopK: jsae sparse vs jsae dense vs sae_lens
    python bench/bench.py --cases default --dense-topk   # the default run's TopK 128 -> 1024 (a sweep's member)
    python bench/bench.py --cases gpu --compute-dtypes float32,bfloat16 --sparse-topk   # on a GPU
    python bench/bench.py --write               # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "cpu": [
        ("standard", 768, 6144, 4096, {"l1_coefficient": 1.0}),
        ("jumprelu", 768, 6144, 4096, {"l0_coefficient": 1.0}),
        ("topk", 768, 6144, 4096, {"k": 32}),
        ("standard", 768, 16384, 4096, {"l1_coefficient": 1.0}),
        ("jumprelu", 768, 16384, 4096, {"l0_coefficient": 1.0}),
        ("topk", 768, 16384, 4096, {"k": 32}),
    ],
    # Gemma-2-2B's residual width, 16k and 64k latents, 4096 and 8192 tokens a step
    "gpu": [(arch, 2304, d_sae, tokens, extra) for d_sae in (16384, 65536) for tokens in (4096, 8192)
            for arch, extra in (("standard", {"l1_coefficient": 1.0}), ("topk", {"k": 64}),
                                ("jumprelu", {"l0_coefficient": 1.0}))],
    "quick": [("standard", 128, 1024, 1024, {"l1_coefficient": 1.0}), ("topk", 128, 1024, 1024, {"k": 16})],
    "topk": [("topk", 768, 16384, 4096, {"k": 32}), ("topk", 768, 6144, 4096, {"k": 32})],
    # the default run's SAE (configs/default.yaml), the member of bench/sweep.py's sweep
    "default": [("topk", 128, 1024, 4096, {"k": 32})],
}


def dense_flops(tokens: int, d_in: int, d_sae: int) -> float:
    """sae_lens' dense step (and the FLOP model's reference count)."""
    return 12.0 * tokens * d_in * d_sae


def jsae_dense_flops(tokens: int, d_in: int, d_sae: int) -> float:
    """jsae's dense step: no per-token input-gradient product."""
    return 10.0 * tokens * d_in * d_sae


def sparse_topk_flops(tokens: int, d_in: int, d_sae: int, k: int) -> float:
    return 2.0 * tokens * d_in * d_sae + 8.0 * tokens * k * d_in


# ---------------------------------------------------------------------- ceilings
# A product the machine has no fast kernel for (bf16 on a CPU without AVX-512 BF16 or AMX) can
# take minutes at n = 2048; the ceilings halve n until one product takes at most this long, and
# say which n they used.
SLOW_PRODUCT_S = 0.5


def jax_product(dtype: str, n: int):
    """A callable that runs one n³ product in JAX and waits for it."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: a @ b)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    return lambda: f(a, b).block_until_ready()


def torch_product(dtype: str, device: str, n: int):
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)

    def product():
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
    return product


def blas_product(n: int):
    """One n³ float32 product on the sgemm jsae's dense CPU kernels call, as they call it:
    single-threaded, one share of the output per core (None where the kernels do not run)."""
    import ctypes
    import threading

    import numpy as np

    from jsae.backends.cpu import kernels

    if not kernels.dense_available():
        return None
    path, symbol, _ = kernels._blas_library()
    sgemm = getattr(ctypes.CDLL(path), symbol)  # the library the kernels loaded (set to one thread)
    threads = len(os.sched_getaffinity(0))
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    ptr = ctypes.c_void_p
    bounds = [n * t // threads for t in range(threads + 1)]

    def share(t):  # rows bounds[t]:bounds[t+1] of c = a b, CblasRowMajor / NoTrans
        rows = bounds[t + 1] - bounds[t]
        sgemm(101, 111, 111, rows, n, n, ctypes.c_float(1.0), ptr(a.ctypes.data + 4 * n * bounds[t]), n,
              ptr(b.ctypes.data), n, ctypes.c_float(0.0), ptr(c.ctypes.data + 4 * n * bounds[t]), n)

    def product():
        workers = [threading.Thread(target=share, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    product()
    np.testing.assert_allclose(c[:4], a[:4] @ b, rtol=1e-3, atol=1e-2)
    return product


def sized_product(make, n: int):
    """(make(n), n), n halved (down to 256) while one product takes longer than SLOW_PRODUCT_S."""
    while True:
        product = make(n)
        if product is None:
            return None, n
        product()
        t = time.perf_counter()
        product()
        if time.perf_counter() - t <= SLOW_PRODUCT_S or n <= 256:
            return product, n
        n //= 2


def best_rate(product, n: int, reps: int = 5, inner: int = 10) -> float:
    """The best-of-`reps` n³ rate of `inner` back-to-back products."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            product()
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n**3 / best


class CeilingProducts:
    """`inner` n³ products of one library, timed among a case's steps (time_steps) so that the
    ceiling of that case's shares is measured over the same minutes as its steps."""

    def __init__(self, product, n: int, inner: int = 3):
        self.product, self.inner = product, inner
        self.flops = inner * 2.0 * n**3

    def __call__(self):
        for _ in range(self.inner):
            self.product()


# ---------------------------------------------------------------------- one step, each library
class JsaeStep:
    """One jsae training step (`steps_per_call` of them back to back, waited for once at the end)."""

    def __init__(self, arch, d_in, d_sae, tokens, extra, dtype, compute_dtype="float32", steps_per_call=1):
        import jax
        import numpy as np

        import jsae
        from jsae.saes import TRAINING_ARCHITECTURES

        sae_cfg = TRAINING_ARCHITECTURES[arch].config_cls(d_in=d_in, d_sae=d_sae, dtype=dtype, **extra)
        cfg = jsae.TrainConfig(sae=sae_cfg, total_training_tokens=10**9, train_batch_size_tokens=tokens,
                               dead_feature_window=10**6, compute_dtype=compute_dtype)
        self.steps_per_call = steps_per_call
        self.plan = jsae.resolve_plan(cfg)
        self.sparse = self.plan.topk == "sparse"
        self.screened = self.sparse and self.plan.encoder_screen
        self.kernels = self.plan.dense_step == "cpu_fused"
        self.flops = (sparse_topk_flops(tokens, d_in, d_sae, sae_cfg.k) if self.sparse
                      else jsae_dense_flops(tokens, d_in, d_sae))
        self.step = jax.jit(jsae.make_train_step(cfg, plan=self.plan), donate_argnums=0,
                            compiler_options=self.plan.jit_compiler_options)
        self.state = jsae.init_train_state(cfg)
        rng = np.random.default_rng(0)
        self.batch = jax.device_put(rng.normal(size=(tokens, d_in)).astype(np.float32).astype(sae_cfg.jnp_dtype))
        self.metrics = None

    def __call__(self):
        for _ in range(self.steps_per_call):
            self.state, self.metrics = self.step(self.state, self.batch)
        self.metrics["losses/overall_loss"].block_until_ready()


class KernelProducts:
    """The products of a jsae dense step on the kernels alone: dense_encode then dense_backward on
    the step's operands (its 10 * tokens * d_in * d_sae FLOPs and the elementwise work between
    them; no losses, clipping or Adam)."""

    def __init__(self, step: JsaeStep):
        import jax
        import jax.numpy as jnp

        from jsae.backends.cpu import kernels

        params = jax.tree.map(jnp.copy, step.state.params)  # the step donates its state
        threshold = params.get("threshold")
        x = step.batch - params["b_dec"]

        def products(x, W_enc, b_enc, W_dec, threshold):
            h, pre, lin, _, _, l0 = kernels.dense_encode(x, W_enc, b_enc, W_dec, threshold)
            return kernels.dense_backward(x, W_dec, h, pre, threshold, lin - x, jnp.zeros_like(b_enc),
                                          jnp.ones_like(l0), bandwidth=0.05)

        self.run = jax.jit(products)
        self.args = (x, params["W_enc"], params["b_enc"], params["W_dec"], threshold)
        self.flops = step.flops
        self.screened = False

    def __call__(self):
        import jax

        jax.block_until_ready(self.run(*self.args))


class SaelensStep:
    """What SAETrainer._train_step does: forward, backward, clip_grad_norm_(1.0), Adam, zero_grad."""

    def __init__(self, arch, d_in, d_sae, tokens, extra, dtype, device, autocast=False, steps_per_call=1):
        import torch
        from sae_lens.registry import get_sae_training_class
        from sae_lens.saes.sae import TrainStepInput

        sae_cls, cfg_cls = get_sae_training_class(arch)
        self.sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, dtype=dtype, device=device, **extra)).to(device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=3e-4)
        self.x = torch.randn(tokens, d_in, device=device).to(getattr(torch, dtype))
        self.coefficients = {name: (c.value if hasattr(c, "value") else c)
                             for name, c in self.sae.get_coefficients().items()}
        self.input_cls = TrainStepInput
        self.device = device
        self.dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
        # SAELens' autocast: the SAE's forward and backward under torch.autocast (bfloat16)
        self.autocast, self.steps_per_call = autocast, steps_per_call

    def __call__(self):
        import torch

        for _ in range(self.steps_per_call):
            with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.autocast):
                out = self.sae.training_forward_pass(self.input_cls(
                    sae_in=self.x, coefficients=self.coefficients, dead_neuron_mask=self.dead, n_training_steps=0,
                    is_logging_step=False))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad()
        if self.device != "cpu":
            torch.cuda.synchronize()


def top_k_timings(tokens: int, d_in: int, d_sae: int, k: int, reps: int = 5) -> dict[str, float]:
    """Milliseconds (best of `reps`) of the TopK selection alone, as the two jsae paths do it.

    dense: the pre-activations (x̃ W_enc + b_enc) · norms written out, then lax.top_k (XLA's CPU
    top-k is one partial sort per row, on one core); sparse: the top-k from the encoder product
    that the sparse path's execution plan runs (`plan.ops().top_k_affine`: jsae's CPU kernel, or
    the blockwise reference), which never writes the pre-activations out.
    """
    import jax
    import jax.numpy as jnp

    import jsae
    from jsae.saes._ops import pre_activations

    cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, topk_implementation="sparse"),
                           total_training_tokens=10**9, train_batch_size_tokens=tokens)
    top_k_affine = jsae.resolve_plan(cfg).ops().top_k_affine

    keys = jax.random.split(jax.random.key(0), 3)
    product = jax.random.normal(keys[0], (tokens, d_sae), jnp.float32)
    b_enc = 0.1 * jax.random.normal(keys[1], (d_sae,), jnp.float32)
    norms = jax.random.uniform(keys[2], (d_sae,), jnp.float32, 0.05, 0.15)
    fns = {
        "hidden_pre_ms": jax.jit(pre_activations),
        "lax_top_k_ms": jax.jit(lambda h: jax.lax.top_k(h, k)),
        "dense_path_ms": jax.jit(lambda p, b, n: jax.lax.top_k(pre_activations(p, b, n), k)),
        "sparse_path_ms": jax.jit(lambda p, b, n: top_k_affine(p, b, n, k)),
    }
    h = fns["hidden_pre_ms"](product, b_enc, norms)
    args = {"lax_top_k_ms": (h,)}
    out = {}
    for name, fn in fns.items():
        a = args.get(name, (product, b_enc, norms))
        jax.block_until_ready(fn(*a))
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t)
        out[name] = 1e3 * best
    return out


def time_steps(fns: dict, warmup: int, reps: int, settle: float = 0.0) -> dict[str, float]:
    """Median seconds per step of each callable, calls alternated so both see the same machine state.

    settle: seconds to pause before each timed call, so the previous library's worker threads
    (OpenMP's and XLA's spin-wait after their work) have gone idle. The order of the calls rotates
    every repeat, so no callable always runs after the same one (a step timed right after sae_lens'
    — which faults in gigabytes of pages a step — can run slower than alone; bench/RESULTS.md).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            fn = fns[name]
            time.sleep(settle)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------- main
# Instruction sets that change the matmul rates of one library or the other (AVX-512 for XLA's and
# oneDNN's float32 kernels, AMX for PyTorch's bfloat16 on CPU).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> dict:
    """The host CPU's model name and which of CPU_FEATURES it has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    model = f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return {"cpu_model": model, "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def machine_label(info: dict) -> str:
    """'cpu, 2 CPUs: Intel(R) Xeon(R) Processor with avx2 avx512f ...' for a results heading."""
    label = f"{info['device']}, {info['cpus']} CPUs"
    if "cpu_model" in info:
        label += f": {info['cpu_model']}" + (f" with {' '.join(info['cpu_features'])}" if info["cpu_features"] else "")
    return label


def machine() -> dict:
    import jax

    info = {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(), "machine": platform.machine()}
    info |= cpu_model()
    if info["backend"] == "cpu":
        from jsae.backends.cpu import kernels

        blas = kernels.blas_library()
        info["blas"] = "none" if blas is None else "MKL" if "libmkl" in blas else "OpenBLAS"
    if os.environ.get("GLIBC_TUNABLES"):  # e.g. glibc.malloc.hugetlb=1 (what `jsae` sets for itself)
        info["GLIBC_TUNABLES"] = os.environ["GLIBC_TUNABLES"]
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        import sae_lens

        info["sae_lens"] = sae_lens.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cpu", choices=sorted(CASES))
    parser.add_argument("--libs", default="jsae,saelens")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds of pause before each timed call, so the other library's threads go idle "
                             "(default: 0.5 on CPU, 0 on GPU, which is timed for throughput)")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="steps run back to back per timed call, waited for once (default: 1 on CPU, 10 on GPU: "
                             "throughput, not the latency of one step from idle)")
    parser.add_argument("--compute-dtypes", default="float32",
                        help="jsae's compute_dtype (the products' inputs), and sae_lens under autocast for bfloat16")
    parser.add_argument("--sparse-topk", action="store_true",
                        help="on topk cases also time jsae's sparse TopK path (topk_implementation='sparse'), the "
                             "accelerator path auto does not pick yet")
    parser.add_argument("--dense-topk", action="store_true",
                        help="on topk cases also time jsae's dense TopK path (topk_implementation='dense') "
                             "and print the top-k selection's own timings")
    parser.add_argument("--xla", action="store_true",
                        help="on standard and jumprelu cases also time jsae's dense step on XLA's products "
                             "(dense_implementation='xla')")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--precision", default=None, help="jax_default_matmul_precision (e.g. highest)")
    args = parser.parse_args()
    libs = args.libs.split(",")
    import jax

    if args.precision:
        jax.config.update("jax_default_matmul_precision", args.precision)

    gpu = jax.default_backend() == "gpu"
    torch_device = "cuda" if gpu else "cpu"
    settle = args.settle if args.settle is not None else (0.0 if gpu else 0.5)
    per_call = args.steps_per_call or (10 if gpu else 1)
    info = machine()
    print(json.dumps(info))
    n = 8192 if gpu else 2048
    makers = {}
    for dtype in ("float32", "bfloat16"):
        makers[f"jax_{dtype}"] = lambda n, dtype=dtype: jax_product(dtype, n)
        if "saelens" in libs:
            makers[f"torch_{dtype}"] = lambda n, dtype=dtype: torch_product(dtype, torch_device, n)
    if not gpu and "jsae" in libs:
        makers["blas_float32"] = blas_product
    products, ceilings, sizes = {}, {}, {}  # sizes: the n of each ceiling's products
    for name, make in makers.items():
        product, size = sized_product(make, n)
        if product is not None:
            products[name], sizes[name] = product, size
            ceilings[name] = best_rate(product, size)
    info["ceiling_n"] = sizes
    print("matmul ceilings (TFLOP/s): " + ceiling_list(ceilings, sizes, 8192 if gpu else 2048), flush=True)

    if args.dense_topk and "jsae" in libs:
        for arch, d_in, d_sae, tokens, extra in CASES[args.cases]:
            if arch == "topk":
                timings = top_k_timings(tokens, d_in, d_sae, extra["k"])
                print(json.dumps({"top_k": f"({tokens}, {d_sae}) k={extra['k']} float32"} | timings), flush=True)

    rows = []
    for dtype, compute in ((d, c) for d in args.dtypes.split(",") for c in args.compute_dtypes.split(",")):
        # the products' dtype: the ceiling to compare with
        product_dtype = "bfloat16" if "bfloat16" in (dtype, compute) else dtype
        for arch, d_in, d_sae, tokens, extra in CASES[args.cases]:
            fns = {}
            if "jsae" in libs:
                case = (arch, d_in, d_sae, tokens)

                def jsae_step(changes=None, case=case, extra=extra, dtype=dtype, compute=compute):
                    return JsaeStep(*case, extra | (changes or {}), dtype, compute, per_call)

                fns["jsae"] = jsae_step()
                if arch == "topk" and args.dense_topk:
                    fns["jsae_dense"] = jsae_step({"topk_implementation": "dense"})
                if arch == "topk" and args.sparse_topk and not fns["jsae"].sparse:
                    fns["jsae_sparse"] = jsae_step({"topk_implementation": "sparse"})
                if fns["jsae"].kernels:
                    fns["jsae_products"] = KernelProducts(fns["jsae"])
                if arch in ("standard", "jumprelu") and args.xla:
                    fns["jsae_xla"] = jsae_step({"dense_implementation": "xla"})
            if "saelens" in libs:
                fns["sae_lens"] = SaelensStep(arch, d_in, d_sae, tokens, extra, dtype, torch_device,
                                              autocast=compute == "bfloat16", steps_per_call=per_call)
            # the ceiling's products too, among the steps: the machine's rate over the same minutes
            for name, product in products.items():
                if name.endswith(f"_{product_dtype}"):
                    fns[f"ceiling_{name}"] = CeilingProducts(product, sizes[name])
            secs = time_steps(fns, args.warmup, args.reps, settle)
            secs = {name: s / getattr(fns[name], "steps_per_call", 1) for name, s in secs.items()}  # per step
            row = {"arch": arch, "d_in": d_in, "d_sae": d_sae, "tokens": tokens,
                   "dtype": dtype if compute == "float32" else f"{dtype}, {compute} compute"}
            alongside = {name: fns[name].flops / secs.pop(name) for name in list(secs) if name.startswith("ceiling_")}
            row |= {f"{name}_tflops": rate / 1e12 for name, rate in alongside.items()}
            # the best median rate any library's products reached among this case's steps (the
            # machine's ceiling, not one library's), else the best rate measured at the start
            ceiling = max(alongside.values(), default=None) or max(
                v for k, v in ceilings.items() if k.endswith(f"_{product_dtype}"))
            row["ceiling_tflops"] = ceiling / 1e12
            if "jsae" in fns:
                row["jsae_path"] = "sparse, screened" if fns["jsae"].screened else \
                    "sparse" if fns["jsae"].sparse else "dense, BLAS kernels" if fns["jsae"].kernels else "dense"
                row["jsae_plan"] = fns["jsae"].plan.describe()
            for name, s in secs.items():
                flops = fns[name].flops if name.startswith("jsae") else dense_flops(tokens, d_in, d_sae)
                row[f"{name}_s"] = s
                row[f"{name}_tok_s"] = tokens / s
                if not getattr(fns[name], "screened", False):
                    row[f"{name}_ceiling_share"] = flops / s / ceiling
            if "jsae_s" in row and "sae_lens_s" in row:
                row["speedup"] = row["sae_lens_s"] / row["jsae_s"]
            if "jsae_s" in row and "jsae_dense_s" in row:
                row["speedup_over_dense"] = row["jsae_dense_s"] / row["jsae_s"]
            if "jsae_s" in row and "jsae_sparse_s" in row:
                row["sparse_over_dense"] = row["jsae_s"] / row["jsae_sparse_s"]
            if "jsae_s" in row and "jsae_xla_s" in row:
                row["speedup_over_xla"] = row["jsae_xla_s"] / row["jsae_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del fns

    table = format_table(rows, ceilings, info)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "ceilings": ceilings, "rows": rows}, indent=2))
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(table + "\n")


def ceiling_list(ceilings: dict, sizes: dict, default_n: int) -> str:
    """"jax_float32 0.279, ..." in TFLOP/s, with the n of any ceiling measured at another n."""
    return ", ".join(f"{k} {v / 1e12:.3f}" + (f" (n = {sizes[k]})" if sizes.get(k, default_n) != default_n else "")
                     for k, v in ceilings.items())


def format_table(rows, ceilings, info) -> str:
    date = datetime.date.today().isoformat()
    dense_column = any("jsae_dense_tok_s" in r for r in rows)
    sparse_column = any("jsae_sparse_tok_s" in r for r in rows)
    xla_column = any("jsae_xla_tok_s" in r for r in rows)
    products_column = any("jsae_products_ceiling_share" in r for r in rows)
    lines = [
        f"### {date} — {info['backend']} ({machine_label(info)}), jax {info['jax']}"
        + (f", torch {info['torch']}" if "torch" in info else "")
        + (f", sae_lens {info['sae_lens']}" if "sae_lens" in info else "")
        + (f", jsae's dense kernels on {info['blas']}" if "blas" in info else "")
        + (f"; both libraries under GLIBC_TUNABLES={info['GLIBC_TUNABLES']}" if "GLIBC_TUNABLES" in info else ""),
        "",
        "Matmul ceiling at the start (best n³ product rate, n = 8192 on GPU / 2048 on CPU, TFLOP/s; JAX's "
        "default float32 precision on GPU uses TF32; blas: the sgemm of jsae's dense CPU kernels): "
        + ceiling_list(ceilings, info.get("ceiling_n", {}),
                                                       8192 if info["backend"] == "gpu" else 2048)
        + ". The same products are timed again among each case's steps, in the same rotation; a row's "
        "shares are of the best median rate any library's products reached there (\"ceiling alongside\").",
        "",
        "| arch | d_in → d_sae | tokens | dtype | ceiling alongside TFLOP/s | jsae tok/s | sae_lens tok/s | speed-up "
        "| jsae share of ceiling |"
        + (" jsae dense tok/s | jsae vs dense |" if dense_column else "")
        + (" jsae sparse tok/s | sparse vs dense |" if sparse_column else "")
        + (" jsae on XLA tok/s | kernels vs XLA |" if xla_column else "")
        + (" kernels' products alone: share of ceiling |" if products_column else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if dense_column else "")
        + ("---|---|" if sparse_column else "") + ("---|---|" if xla_column else "")
        + ("---|" if products_column else ""),
    ]
    for r in rows:
        arch = f"{r['arch']} ({r['jsae_path']})" if r.get("jsae_path", "dense") != "dense" else r["arch"]
        jsae_tok = f"{r['jsae_tok_s']:,.0f}" if "jsae_tok_s" in r else "—"
        sl_tok = f"{r['sae_lens_tok_s']:,.0f}" if "sae_lens_tok_s" in r else "—"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        share = f"{100 * r['jsae_ceiling_share']:.0f}%" if "jsae_ceiling_share" in r else "—"
        ceiling = f"{r['ceiling_tflops']:.3f}" if "ceiling_tflops" in r else "—"
        line = f"| {arch} | {r['d_in']} → {r['d_sae']} | {r['tokens']} | {r['dtype']} | {ceiling} | {jsae_tok} | {sl_tok} | {speed} | {share} |"
        if dense_column:
            dense_tok = f"{r['jsae_dense_tok_s']:,.0f}" if "jsae_dense_tok_s" in r else "—"
            over = f"{r['speedup_over_dense']:.2f}x" if "speedup_over_dense" in r else "—"
            line += f" {dense_tok} | {over} |"
        if sparse_column:
            sparse_tok = f"{r['jsae_sparse_tok_s']:,.0f}" if "jsae_sparse_tok_s" in r else "—"
            over = f"{r['sparse_over_dense']:.2f}x" if "sparse_over_dense" in r else "—"
            line += f" {sparse_tok} | {over} |"
        if xla_column:
            xla_tok = f"{r['jsae_xla_tok_s']:,.0f}" if "jsae_xla_tok_s" in r else "—"
            over = f"{r['speedup_over_xla']:.2f}x" if "speedup_over_xla" in r else "—"
            line += f" {xla_tok} | {over} |"
        if products_column:
            alone = r.get("jsae_products_ceiling_share")
            line += f" {100 * alone:.0f}% |" if alone is not None else " — |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
