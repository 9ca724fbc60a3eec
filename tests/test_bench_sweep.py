"""The guidance sweep compares grid points on common random numbers (benchmarks/guidance_sweep.py)."""

import importlib
from pathlib import Path

import pytest
import torch

from condiff.denoiser import GaussianDenoiser
from condiff.operators import Inpainting
from condiff.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    return importlib.import_module("guidance_sweep")


def test_equal_grid_points_score_equally_and_others_differ(monkeypatch):
    """Two copies of one setting see the same images and the same sampling noise, so they score the
    same to the last bit; a different setting differs (in one batch, with its own noise per point,
    the copies differed too)."""
    sweep = _sweep(monkeypatch)
    den = GaussianDenoiser(Schedule.linear(200), mean=0.0, std=0.5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    op = Inpainting(mask, sigma_y=0.05)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5
    y = op.measure(x, torch.Generator().manual_seed(2))
    for method, grid in (("dps", {"zeta": [0.5, 0.5, 2.0]}), ("dsg+dps", {"rate": [0.3, 0.3, 0.9]})):
        scores = [s for _, s in sweep.evaluate(den, method, {}, grid, x, op, y, 8, "cpu", seed=3)]
        assert scores[0] == scores[1]
        assert scores[2] != scores[0]
