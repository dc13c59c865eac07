"""GPU-path checks run on a lent GPU machine: DLPack zero copy on CUDA, jsae forward/step on GPU vs CPU."""

import numpy as np


def main() -> None:
    import jax
    import jax.numpy as jnp
    import torch

    import jsae
    from bridge.dlpack import jax_to_torch, torch_to_jax

    print("jax devices:", jax.devices(), flush=True)
    jax.config.update("jax_default_matmul_precision", "highest")  # compare GPU and CPU at full float32
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(4096, 2304, device="cuda").to(dtype)
        x = torch_to_jax(t)
        print(f"DLPack torch->jax {dtype}: platform {x.devices()} zero-copy {x.unsafe_buffer_pointer() == t.data_ptr()}")
        back = jax_to_torch(x)
        print(f"DLPack jax->torch {dtype}: zero-copy {back.data_ptr() == t.data_ptr()}")

    cfg = jsae.TrainConfig(sae=jsae.TopKTrainingSAEConfig(d_in=256, d_sae=2048, k=32), total_training_tokens=20 * 1024,
                           train_batch_size_tokens=1024, lr=1e-3, progress_bar=False, n_devices=1)
    data = [np.random.default_rng(i).normal(size=(1024, 256)).astype(np.float32) for i in range(20)]
    gpu_sae = jsae.train(cfg, iter(data))
    with jax.default_device(jax.devices("cpu")[0]):
        cpu_trainer = jsae.Trainer(cfg, devices=jax.devices("cpu")[:1])
        cpu_sae = cpu_trainer.fit(iter(data))
    for name in gpu_sae.params:
        a = np.asarray(gpu_sae.params[name], np.float64)
        b = np.asarray(cpu_sae.params[name], np.float64)
        print(f"20 TopK steps GPU vs CPU, {name}: relative diff {np.linalg.norm(a - b) / np.linalg.norm(b):.2e}")
    x = jnp.asarray(data[0])
    print("GPU encode/decode max|diff| vs CPU:",
          float(jnp.max(jnp.abs(jnp.asarray(np.asarray(gpu_sae(x))) - cpu_sae(np.asarray(data[0]))))))


if __name__ == "__main__":
    main()
