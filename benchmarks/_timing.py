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
    bar = progress_bar((warmup + repeats) * len(fns), True, unit="run", desc=desc)  # None under --quiet

    def advance(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update()

    try:
        for _ in range(warmup):
            for k, fn in fns.items():
                fn()
                advance(f"{k} (warm-up)")
        out: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                out[k].append(timed(fn, device))
                advance(k)
    finally:
        if bar is not None:
            bar.close()
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the pairwise ratios a_i / b_i of interleaved runs."""
    return statistics.median(x / y for x, y in zip(a, b))


def noise_note(a: list[float], b: list[float], what: str, spread: float = 0.1) -> list[str]:
    """A note for the table where the interleaved runs were noisy (a busy machine): the pairwise ratios
    ``a_i / b_i`` range more than ``spread`` around their median, or the medians' own ratio lies on the other side
    of 1 from it (a table whose time columns then disagree with its ratio column). ``[]`` for quiet runs."""
    ratios = [x / y for x, y in zip(a, b)]
    mid, lo, hi = statistics.median(ratios), min(ratios), max(ratios)
    of_medians = median(a) / median(b)
    if hi - lo <= spread * mid and (of_medians - 1) * (mid - 1) >= 0:
        return []
    return [f"{what}: the pairwise ratios ranged {lo:.3g} to {hi:.3g} around their median {mid:.3g} (the medians' "
            f"own ratio: {of_medians:.3g}): the machine was busy while it ran; rerun it on a quiet one to judge."]
