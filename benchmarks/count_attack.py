"""How far an optimiser can fool the counting distance: ``l(x) = |count_CNN(x) - k|`` minimised over
the pixels of images that hold the wrong number of sources.

Images with ``k - 1`` and ``k + 1`` sources (the count data's generator, its own seed) are moved by
Adam on ``l(x) + lam * mean|x - x_start|`` (the second term an L1 pull to the start, like a mirror
map's cycle term). Each row gives the mean ``l`` before and after and the share of images that the
peak finder (condiff.data.sources.count_sources, which does not use the CNN) then counts at exactly
``k``. A distance that could only be lowered by adding or removing a real source would give 100%;
what falls short is the room any optimiser of the distance (a fine-tuned inverse map, a guidance
step, a pixel attack) has to satisfy the counter without fixing the count. The first row gives the
peak finder's exact-``k`` share on ``k``-source images (its own error).
"""

from __future__ import annotations

import torch

from condiff.constraints import CountConstraint
from condiff.data.sources import count_sources, render_sources
from condiff.sample import progress_bar

PROFILES = {
    "quick": {"size": 16, "k": 4, "n": 128, "steps": 300, "lr": 0.01},
    "full": {"size": 32, "k": 8, "n": 512, "steps": 500, "lr": 0.01},
}


def _attack(con: CountConstraint, x: torch.Tensor, lam: float, steps: int, lr: float, bar=None) -> torch.Tensor:
    z = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = con(z).mean() + lam * (z - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    return z.detach()


def run(profile: str = "quick", device: str = "cpu") -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    p = PROFILES[profile]
    k, n = p["k"], p["n"]
    con = CountConstraint(k=k, size=p["size"], device=device).to(device)  # first use: its own progress bar
    g = torch.Generator().manual_seed(12345)
    rows = []
    x, _ = render_sources(torch.full((n,), k), p["size"], g)
    rows.append({"start": f"{k} sources", "lam": "", "l before": float(con(x.to(device)).mean()),
                 "l after": "", "exactly k (peak finder)": float((count_sources(x) == k).float().mean())})
    starts, lams = (k - 1, k + 1), (0.0, 1.0)
    # as the Trainer's: on a terminal, or refreshed every 10 s in a log (condiff.sample.progress_bar)
    bar = progress_bar(len(starts) * len(lams) * p["steps"], True, unit="step", desc="pixel attacks")
    for start in starts:
        x, _ = render_sources(torch.full((n,), start), p["size"], g)
        x = x.to(device)
        before = float(con(x).mean())
        for lam in lams:
            z = _attack(con, x, lam, p["steps"], p["lr"], bar)
            c = count_sources(z.cpu())
            rows.append({
                "start": f"{start} sources",
                "lam": lam,
                "l before": before,
                "l after": float(con(z).mean()),
                "exactly k (peak finder)": float((c == k).float().mean()),
                "peaks after (min-max)": f"{int(c.min())}-{int(c.max())}",
                "max |change|": float((z - x).abs().amax((1, 2, 3)).mean()),
            })
    if bar is not None:  # (None under --quiet)
        bar.close()
    return {
        "title": f"Count distance under a pixel attack ({profile})",
        "columns": ["start", "lam", "l before", "l after", "exactly k (peak finder)",
                    "peaks after (min-max)", "max |change|"],
        "rows": rows,
        "notes": [
            f"{n} generated images per start, {p['size']}x{p['size']}, k = {k}; Adam (lr {p['lr']}, "
            f"{p['steps']} steps) on l(x) + lam * mean|x - x_start|, the project's cached counter "
            "(condiff.constraints.count.COUNTER_RECIPE). 'max |change|': the mean over images of the "
            "largest pixel change, on the [-1, 1] scale (a source adds 1.2 to 2 at its centre).",
        ],
    }
