"""Training-step time of the trainer in float32 against the same steps under bf16 autocast.

The question it answers: would a mixed-precision option pay? Two UNets: the digits preset's (8x8,
base 32, batch 128) and, in the full (GPU) profile, the NAMM full profile's (64x64, base 64, mults
1-2-2-2, batch 64). Each variant is a real Trainer running its own steps; runs alternate, and the table
gives the median milliseconds per step and the ratio bf16 / fp32 (below 1: bf16 is faster).
On one H200 (2026-12-04, a scratch version of this measurement) bf16 was slower at both sizes.
"""

from __future__ import annotations

import torch
from _timing import alternate, median, median_ratio

from condiff.cli.config import preset
from condiff.nets import build_net
from condiff.schedule import Schedule
from condiff.train import DenoisingObjective, TrainConfig, Trainer

DIGITS = ("digits UNet 8x8, batch 128", dict(preset("digits")["model"]), 8, 128)
NAMM_FULL = ("NAMM full UNet 64x64, batch 64", {"name": "unet", "in_channels": 1, "base": 64, "mults": [1, 2, 2, 2]},
             64, 64)
PROFILES = {"quick": {"models": [DIGITS], "steps": 10, "repeats": 3},
            "full": {"models": [DIGITS, NAMM_FULL], "steps": 100, "repeats": 5}}


class Autocast:
    """An objective whose loss is computed under bf16 autocast (the rest is the wrapped objective's)."""

    def __init__(self, base: DenoisingObjective, device: str) -> None:
        self.base, self.device_type = base, torch.device(device).type

    def loss(self, model, step, generator):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.base.loss(model, step, generator)

    def __getattr__(self, name):
        return getattr(self.base, name)


def run(profile: str = "quick", device: str = "cpu") -> dict:
    p = PROFILES[profile]
    rows = []
    for label, model, size, batch in p["models"]:
        x = torch.randn(2000, 1, size, size)
        trainers = {}
        for name in ("fp32", "bf16"):
            torch.manual_seed(0)
            obj = DenoisingObjective(x, Schedule.linear(1000), batch)
            cfg = TrainConfig(steps=1, batch_size=batch, device=device, progress=False, log_every=p["steps"],
                              ckpt_every=10**9, warmup=0)
            trainers[name] = Trainer(build_net(model), obj if name == "fp32" else Autocast(obj, device), cfg)

        def steps(tr: Trainer) -> None:
            tr.cfg.steps = tr.step + p["steps"]
            tr.fit()

        times = alternate({k: (lambda tr=tr: steps(tr)) for k, tr in trainers.items()}, p["repeats"], device,
                          desc=label)
        fp32, bf16 = (median(times[k]) / p["steps"] * 1e3 for k in ("fp32", "bf16"))
        rows.append({"model": label, "steps per run": p["steps"], "fp32 (ms/step)": fp32, "bf16 (ms/step)": bf16,
                     "bf16 / fp32": median_ratio(times["bf16"], times["fp32"])})
    return {"title": "Training step: float32 against bf16 autocast",
            "columns": ["model", "steps per run", "fp32 (ms/step)", "bf16 (ms/step)", "bf16 / fp32"],
            "rows": rows,
            "notes": ["Median over interleaved runs of the same Trainer loop; bf16 / fp32 is the median of "
                      "the per-pair ratios (below 1: bf16 faster)."] + ([cpu_bf16()] if device == "cpu" else [])}


def cpu_bf16() -> str:
    """What the CPU offers bf16 (its /proc/cpuinfo flags), on which the CPU's ratio turns: the quick profile gave
    bf16 20x slower on one 2-core machine (2026-12-04, flags not recorded) and 0.82x on one with AMX (2026-12-06)."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "The CPU's bf16 instructions are unknown here (no /proc/cpuinfo)."
    have = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return (f"The CPU has bf16 instructions ({', '.join(have)}), on which the bf16 column depends." if have else
            "The CPU has no bf16 instructions (neither amx_bf16 nor avx512_bf16): bf16 is emulated, and slow.")
