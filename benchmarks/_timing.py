"""Timing helpers shared by the benchmarks: alternating runs, medians, device sync."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from condiff.sample import progress_bar


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)  # the benchmark's own GPU, not the current one


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device: str,
              warmup: int = 1, desc: str = "timing") -> dict[str, list[float]]:
    """Run each function ``repeats`` times, interleaved (a, b, a, b, ...), so drifts in machine load
    hit all of them alike. Returns the list of wall times per name. A progress bar (``desc``) counts the runs,
    the warm-up's included."""
    bar = progress_bar((warmup + repeats) * len(fns), True, unit="run", desc=desc)
    try:
        for _ in range(warmup):
            for k, fn in fns.items():
                bar.set_postfix_str(f"{k} (warm-up)", refresh=False)
                fn()
                bar.update()
        out: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                bar.set_postfix_str(k, refresh=False)
                out[k].append(timed(fn, device))
                bar.update()
    finally:
        bar.close()
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the pairwise ratios a_i / b_i of interleaved runs."""
    return statistics.median(x / y for x, y in zip(a, b))
