"""condiff's DDIM loop vs diffusers' DDIMScheduler loop on the same UNet2DModel.

Same random UNet, same timesteps ("leading" spacing, diffusers' default), same batch and start
noise, eta = 0. Runs alternate; the table gives the median ratio of wall times (target <= 1.0) and
the largest difference between the two outputs.
"""

from __future__ import annotations

import torch
from _timing import alternate, median, median_ratio, noise_note

from condiff.denoiser import DiffusersDenoiser
from condiff.sample import ddim

PROFILES = {"quick": {"batch": 16, "size": 32, "channels": (32, 64), "steps": 20, "repeats": 5},
            "full": {"batch": 64, "size": 64, "channels": (64, 128, 256), "steps": 100, "repeats": 10}}


def run(profile: str = "quick", device: str = "cpu") -> dict:
    from diffusers import DDIMScheduler, UNet2DModel

    p = PROFILES[profile]
    torch.manual_seed(0)
    n = len(p["channels"])
    unet = UNet2DModel(sample_size=p["size"], in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=p["channels"], down_block_types=("DownBlock2D",) * n,
                       up_block_types=("UpBlock2D",) * n, norm_num_groups=8).to(device).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(p["steps"])
    den = DiffusersDenoiser(unet, dict(sched.config))
    x0 = torch.randn(p["batch"], 3, p["size"], p["size"], device=device)
    ts = den.schedule.timesteps(p["steps"], "leading")
    out = {}

    def ours():
        out["ours"] = ddim(den, x0, ts, eta=0.0)

    @torch.no_grad()
    def theirs():
        x = x0
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out["theirs"] = x

    times = alternate({"condiff": ours, "diffusers": theirs}, p["repeats"], device, desc="condiff vs diffusers")
    ratio = median_ratio(times["condiff"], times["diffusers"])
    diff = float((out["ours"] - out["theirs"]).abs().max())
    row = {"UNet2DModel": f"{p['size']}px, channels {list(p['channels'])}", "batch": p["batch"],
           "steps": p["steps"], "condiff (s)": median(times["condiff"]), "diffusers (s)": median(times["diffusers"]),
           "median ratio": ratio, "max |diff|": diff, "target <= 1.0": "met" if ratio <= 1.0 else "MISSED"}
    return {"title": "condiff DDIM loop vs diffusers DDIMScheduler loop",
            "columns": list(row), "rows": [row],
            "notes": ["Median of per-pair ratios condiff/diffusers over interleaved repeats; "
                      "max |diff| checks that both loops compute the same samples.",
                      *noise_note(times["condiff"], times["diffusers"], "condiff / diffusers")]}
