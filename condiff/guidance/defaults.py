"""Default hyperparameters per task and step budget.

``GENERIC`` holds the fallbacks for tasks nobody swept (the DSG paper's rate 0.2 / interval 1 and
DPS's zeta = 1). ``TUNED`` was chosen by the sweep in ``benchmarks/guidance_sweep.py`` on images of
the TRAIN split only (never the test images the benchmark reports); its table is in BENCHMARKS.md
(section "Guidance hyperparameter sweep") and benchmarks/results/guidance-sweep-<profile>.json.
DPS and DPS+DSG at 20, 50 and 100 steps come from the ``quick-refine`` profile of the same sweep
(32 training images instead of 8; benchmarks/results/guidance-sweep-quick-refine.json).
DPS+DSG at every budget was then re-chosen with DSG's ``final`` step in the grid (rate x final; at
1000 steps also x interval 1, 5): ``--profile quick-final`` (32 train images) and
``quick-final-1000`` and ``quick-final-1000-hi`` (32 train images); benchmarks/results/guidance-sweep-quick-final*.json.
At 1000 steps both DPS and DPS+DSG were finally re-chosen on 128 train images (``quick-1000-confirm``,
over the region that ``quick-1000-refine`` on 32 images pointed to): on 32 images the same setting
scored up to 0.9 dB apart in two batches. benchmarks/results/guidance-sweep-quick-1000-*.json.
Finally (2026-12-01) the sweep began to sample every grid point from the same seed (common random
numbers; in one batch each point had drawn its own noise, which on 128 images moved a point's mean
PSNR by up to 0.8 dB), and DPS and DPS+DSG were re-chosen that way at every budget on the same 128
training images: ``quick-crn`` (20, 50, 100 steps) and ``quick-1000-crn`` (1000 steps, interval 5).
More CRN runs on the same images and seeds followed (rates below 0.2 at 20 steps; at 1000 steps
DPS's zeta between its points, DPS+DSG at intervals 10, 20, 30 and rates up to 1, and DPS+DSG
with DPS's own step between its guided steps, ``between = "base"``, which the digits tasks chose), and the
``dps`` and ``dsg+dps`` entries below are now the best point of each over all of these runs:
``--profile crn-best`` (benchmarks/results/guidance-sweep-crn-best.json). The other methods keep
the quick sweep's.
For a step budget the sweep did not cover, the nearest swept budget (in log steps) is used.
"""

from __future__ import annotations

import copy
import math

GENERIC: dict[str, dict] = {
    "dps": {"zeta": 1.0},
    "freedom": {"zeta": 1.0, "repeats": 2, "travel": (0.5, 0.8)},
    "ugd": {"forward": 1.0, "backward_steps": 3, "backward_lr": 0.1, "recurrence": 2},
    "dsg+dps": {"rate": 0.2, "interval": 1},
    "dsg+freedom": {"rate": 0.2, "interval": 1, "repeats": 2, "travel": (0.5, 0.8)},
    "dsg+ugd": {"rate": 0.2, "interval": 1, "backward_steps": 3, "backward_lr": 0.1, "recurrence": 2},
}

# task -> steps -> method -> hyperparameters, chosen by `condiff bench guidance-sweep --profile quick`
# (benchmarks/guidance_sweep.py; train split, 8 images per task; results/guidance-sweep-quick.json);
# "dps" and "dsg+dps" by `--profile crn-best`: the best point over the sweeps on 128 train images with
# common random numbers (results/guidance-sweep-crn-best.json and the runs it names)
TUNED: dict[str, dict[int, dict[str, dict]]] = {
    "digits/inpaint-random": {
        20: {
            "dps": {"zeta": 2.0},
            "dsg+dps": {"interval": 1, "rate": 1.0, "final": 0.5},
            "freedom": {"zeta": 1.0},
            "dsg+freedom": {"rate": 1.0, "interval": 1},
            "ugd": {"forward": 30.0, "backward_lr": 0.0},
            "dsg+ugd": {"backward_lr": 0.0, "rate": 0.5, "interval": 1},
        },
        50: {
            "dps": {"zeta": 2.0},
            "dsg+dps": {"interval": 1, "rate": 1.0, "final": 0.25},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 0.5, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.3},
            "dsg+ugd": {"backward_lr": 0.3, "rate": 0.7, "interval": 1},
        },
        100: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 0.7, "final": 0.25},
            "freedom": {"zeta": 0.5},
            "dsg+freedom": {"rate": 0.7, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.0},
            "dsg+ugd": {"backward_lr": 0.0, "rate": 0.5, "interval": 1},
        },
        1000: {
            "dps": {"zeta": 0.2},
            "dsg+dps": {"interval": 20, "rate": 0.4, "final": 0.25, "zeta": 0.1, "between": "base"},
        },
    },
    "digits/inpaint-box": {
        20: {
            "dps": {"zeta": 2.0},
            "dsg+dps": {"interval": 1, "rate": 1.0, "final": 0.5},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 1.0, "interval": 1},
            "ugd": {"forward": 30.0, "backward_lr": 0.0},
            "dsg+ugd": {"backward_lr": 0.0, "rate": 0.7, "interval": 1},
        },
        50: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 0.7, "final": 0.25},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 0.5, "interval": 1},
            "ugd": {"forward": 30.0, "backward_lr": 0.3},
            "dsg+ugd": {"backward_lr": 0.3, "rate": 0.7, "interval": 1},
        },
        100: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 1.0, "final": 0.25},
            "freedom": {"zeta": 0.5},
            "dsg+freedom": {"rate": 0.7, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.0},
            "dsg+ugd": {"backward_lr": 0.0, "rate": 1.0, "interval": 1},
        },
        1000: {
            "dps": {"zeta": 0.2},
            "dsg+dps": {"interval": 20, "rate": 1.0, "final": 0.25, "zeta": 0.1, "between": "base"},
        },
    },
    "patches/sr": {
        20: {
            "dps": {"zeta": 2.0},
            "dsg+dps": {"interval": 1, "rate": 0.2, "final": 1.5},
            "freedom": {"zeta": 5.0},
            "dsg+freedom": {"rate": 0.2, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.0},
            "dsg+ugd": {"backward_lr": 0.0, "rate": 0.3, "interval": 1},
        },
        50: {
            "dps": {"zeta": 2.0},
            "dsg+dps": {"interval": 1, "rate": 0.3, "final": 0.25},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 0.5, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.1},
            "dsg+ugd": {"backward_lr": 0.1, "rate": 0.3, "interval": 1},
        },
        100: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 0.3, "final": 0.0},
            "freedom": {"zeta": 1.0},
            "dsg+freedom": {"rate": 0.5, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.1},
            "dsg+ugd": {"backward_lr": 0.1, "rate": 1.0, "interval": 1},
        },
        1000: {
            "dps": {"zeta": 0.15},
            "dsg+dps": {"interval": 20, "rate": 1.0, "final": 0.5},
        },
    },
    "patches/blur": {
        20: {
            "dps": {"zeta": 1.5},
            "dsg+dps": {"interval": 1, "rate": 0.2, "final": 1.5},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 0.2, "interval": 1},
            "ugd": {"forward": 30.0, "backward_lr": 0.1},
            "dsg+ugd": {"backward_lr": 0.1, "rate": 0.3, "interval": 1},
        },
        50: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 0.3, "final": 1.0},
            "freedom": {"zeta": 2.0},
            "dsg+freedom": {"rate": 0.3, "interval": 1},
            "ugd": {"forward": 30.0, "backward_lr": 0.1},
            "dsg+ugd": {"backward_lr": 0.1, "rate": 0.2, "interval": 1},
        },
        100: {
            "dps": {"zeta": 1.0},
            "dsg+dps": {"interval": 1, "rate": 0.3, "final": 0.25},
            "freedom": {"zeta": 1.0},
            "dsg+freedom": {"rate": 0.7, "interval": 1},
            "ugd": {"forward": 100.0, "backward_lr": 0.1},
            "dsg+ugd": {"backward_lr": 0.1, "rate": 0.2, "interval": 1},
        },
        1000: {
            "dps": {"zeta": 0.25},
            "dsg+dps": {"interval": 5, "rate": 1.0, "final": 0.0},
        },
    },
}


def default_hyperparameters(method: str, task: str | None = None, steps: int | None = None) -> dict:
    """Hyperparameters for ``method`` (e.g. ``"dsg+dps"``) on ``task`` (e.g. ``"digits/inpaint-random"``)
    at ``steps`` sampler steps: the tuned values where the sweep covered the task, else ``GENERIC``."""
    key = method.strip().lower()
    if key not in GENERIC:
        raise ValueError(f"unknown guidance method {method!r}; expected one of {sorted(GENERIC)}")
    out = copy.deepcopy(GENERIC[key])
    table = TUNED.get(task or "", {})
    if table and steps is not None:
        near = min(table, key=lambda s: abs(math.log(s) - math.log(max(int(steps), 1))))
        out.update(copy.deepcopy(table[near].get(key, {})))
    return out
