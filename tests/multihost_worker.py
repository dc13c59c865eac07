"""One process of a simulated multi-host run (launched by test_multihost.py and test_feature_sharding.py).

Arguments: process_id n_processes port out_dir [devices_per_process (2) [model_axis_size (1) [checkpoint_path]]].
"""

import os
import sys

process_id, n_processes, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
local_devices = int(sys.argv[5]) if len(sys.argv) > 5 else 2
model_axis_size = int(sys.argv[6]) if len(sys.argv) > 6 else 1
checkpoint_path = sys.argv[7] if len(sys.argv) > 7 else None
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"

import jax  # noqa: E402

jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n_processes, process_id=process_id)

sys.path.insert(0, os.path.dirname(__file__))
from test_multihost import BATCH, make_batches, make_cfg  # noqa: E402

import jsae  # noqa: E402

assert jax.device_count() == local_devices * n_processes and jax.local_device_count() == local_devices
local = BATCH // n_processes
rows = slice(process_id * local, (process_id + 1) * local)
out = os.path.join(out_dir, f"p{process_id}")
cfg = make_cfg(output_path=os.path.join(out, "sae"), log_path=os.path.join(out, "metrics.jsonl"),
               model_axis_size=model_axis_size, checkpoint_path=checkpoint_path)
jsae.Trainer(cfg).fit(batch[rows] for batch in make_batches())
print("done", process_id, flush=True)
