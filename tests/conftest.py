"""Test-wide isolation: no network, no user caches, seeded randomness.

The environment is set when this file is imported — before any test module imports open_clip or
huggingface_hub, which read their cache locations at import time."""

from __future__ import annotations

import os
import tempfile

import pytest

_ROOT = tempfile.mkdtemp(prefix="s2clip-tests-")
os.environ["S2CLIP_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["S2CLIP_WEIGHTS_DIR"] = os.path.join(_ROOT, "weights")
os.environ["HF_HOME"] = os.path.join(_ROOT, "hf")
os.environ["HF_HUB_CACHE"] = os.path.join(_ROOT, "hf", "hub")
os.environ["TORCH_HOME"] = os.path.join(_ROOT, "torch")
os.environ["S2CLIP_DATA_DIR"] = os.path.join(_ROOT, "data")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)
