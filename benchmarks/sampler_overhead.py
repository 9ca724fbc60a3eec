"""Sampling time vs (steps x one forward pass) of the same network and batch.

The digits UNet of the demo preset, batch 256, 100 DDIM steps. The ratio is what the sampler loop
costs on top of the network itself (target <= 1.05).
"""

from __future__ import annotations

import torch
from _timing import alternate, median, median_ratio, noise_note

from condiff.cli.config import preset
from condiff.denoiser import NetDenoiser
from condiff.nets import build_net
from condiff.sample import ddim
from condiff.schedule import Schedule

PROFILES = {"quick": {"batch": 256, "steps": 100, "repeats": 5},
            "full": {"batch": 256, "steps": 100, "repeats": 20}}


def run(profile: str = "quick", device: str = "cpu") -> dict:
    p = PROFILES[profile]
    torch.manual_seed(0)
    net = build_net({**preset("digits")["model"]}).to(device).eval()
    den = NetDenoiser(net, Schedule.linear(1000))
    B, S = p["batch"], p["steps"]
    x = torch.randn(B, 1, 8, 8, device=device)
    ts = den.schedule.timesteps(S)
    t = torch.full((B,), 500, device=device, dtype=torch.long)
    g = torch.Generator(device=device)

    def forwards():
        with torch.inference_mode():  # the cheapest forward, as the sampler runs it
            for _ in range(S):
                net(x, t)

    rows, noisy = [], []
    for eta in (0.0, 1.0):
        def sampling(eta=eta):
            g.manual_seed(0)
            ddim(den, x, ts, eta=eta, generator=g)

        times = alternate({"forward": forwards, "sample": sampling}, p["repeats"], device, desc=f"DDIM eta={eta:g}")
        ratio = median_ratio(times["sample"], times["forward"])
        noisy += noise_note(times["sample"], times["forward"], f"DDIM eta={eta:g}")
        rows.append({"sampler": f"DDIM eta={eta:g}", "batch": B, "steps": S,
                     "steps x forward (s)": median(times["forward"]), "sampling (s)": median(times["sample"]),
                     "ratio": ratio, "target <= 1.05": "met" if ratio <= 1.05 else "MISSED"})
    return {"title": "Sampler overhead (digits UNet)",
            "columns": ["sampler", "batch", "steps", "steps x forward (s)", "sampling (s)", "ratio",
                        "target <= 1.05"],
            "rows": rows,
            "notes": ["Ratio = median over interleaved repeats of (sampling time) / (steps x one forward "
                      "pass of the same network on the same batch).", *noisy]}
