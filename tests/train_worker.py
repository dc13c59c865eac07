"""A training run in its own process, optionally killing itself at a given batch, or after the loop
("eval": in the final evaluation; "save": as the SAE is written) (test_crash_safety.py)."""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
out_dir, kill_at, sig = sys.argv[1], int(sys.argv[2]), sys.argv[3]
after_loop = sys.argv[4] if len(sys.argv) > 4 else ""

import numpy as np  # noqa: E402

import jsae  # noqa: E402
from jsae.training.data import ArrayBatches  # noqa: E402


class KillingBatches(ArrayBatches):
    def __iter__(self):
        for batch in super().__iter__():
            if self.position - 1 == kill_at:
                os.kill(os.getpid(), getattr(signal, sig))
            yield batch


data = np.random.default_rng(3).normal(size=(4096, 16)).astype(np.float32) * 2 + 0.5
cfg = jsae.TrainConfig(
    sae=jsae.TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, normalize_activations="expected_average_only_in"),
    total_training_tokens=40 * 128, train_batch_size_tokens=128, lr=3e-3, lr_scheduler_name="cosineannealing",
    dead_feature_window=6, n_batches_for_norm_estimate=3, checkpoint_path=os.path.join(out_dir, "ckpt"),
    checkpoint_every_n_steps=5, keep_checkpoints=2, output_path=os.path.join(out_dir, "sae"), progress_bar=False,
    log_every_n_steps=1)


def kill(*_):
    os.kill(os.getpid(), getattr(signal, sig))


if after_loop == "save":
    save_model = jsae.SAE.save_model
    jsae.SAE.save_model = lambda self, path: kill() or save_model(self, path)
evaluator = (lambda sae: kill() or {"l0": 1.0}) if after_loop == "eval" else None
jsae.train(cfg, KillingBatches(data, 128, seed=1), evaluator=evaluator)
print("finished", flush=True)
