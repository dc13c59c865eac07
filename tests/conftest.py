"""Test-wide setup: CPU only, 8 forced host devices, no network, a private Hugging Face home."""

import os
import tempfile

# Must happen before jax / huggingface_hub are imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="jsae-test-hf-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
