import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Project caches (classifier, generated data) go to a per-session temp dir, never ~/.cache."""
    root = os.environ.get("CONDIFF_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("CONDIFF_CACHE", root)
