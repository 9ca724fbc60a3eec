"""The guidance sweep compares grid points on common random numbers (benchmarks/guidance_sweep.py)."""


import pytest
import torch

from condiff.denoiser import GaussianDenoiser
from condiff.operators import Inpainting
from condiff.schedule import Schedule


@pytest.fixture
def sweep(bench_module):
    return bench_module("guidance_sweep")


def test_equal_grid_points_score_equally_and_others_differ(sweep, monkeypatch):
    """Two copies of one setting see the same images and the same sampling noise, so they score the
    same to the last bit; a different setting differs (in one batch, with its own noise per point,
    the copies differed too)."""
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


def test_a_method_named_grid_reaches_only_that_method(sweep, monkeypatch):
    """``grids["dsg+dps"]`` adds DPS+DSG's own grid values (DPS's zeta inside it, ``between``) to its
    grid at every interval; the top-level zeta grid stays DPS's, and the rows record both."""
    seen = []

    def fake(den, method, fixed, grid, *rest, **kw):
        seen.append((method, fixed, grid))
        points = [dict(zip(grid, v)) for v in sweep._product(list(grid.values()))]
        return [(p, float(i)) for i, p in enumerate(points)]

    monkeypatch.setattr(sweep, "evaluate", fake)
    rows = []
    grids = {"zeta": [0.5, 1.0], "rate": [0.2, 0.4], "interval": [10, 20],
             "dsg+dps": {"zeta": [0.1], "between": ["base"]}}
    chosen = sweep.sweep_budget(None, "t", None, None, None, 1000, ["dps", "dsg+dps"], "cpu", rows, grids)
    assert seen[0] == ("dps", {}, {"zeta": [0.5, 1.0]})
    assert [(f, g) for m, f, g in seen[1:]] == [
        ({"interval": k}, {"rate": [0.2, 0.4], "zeta": [0.1], "between": ["base"]}) for k in (10, 20)]
    assert chosen["dsg+dps"] == {"interval": 10, "rate": 0.4, "zeta": 0.1, "between": "base"}
    assert rows[1]["chosen"] == "interval=10, rate=0.4, zeta=0.1, between=base"


def _row(task, steps, method, fixed, scores):
    return {"task": task, "steps": steps, "method": method, "fixed": fixed, "scores": scores}


def test_combine_takes_the_best_point_over_runs_and_refuses_disagreeing_ones(sweep, monkeypatch, tmp_path):
    """The best of several CRN sweeps: the highest score per task, budget and method, with the
    settings a row held fixed (DSG's interval, UGD+DSG's backward_lr) joined to its grid point; one
    point scored differently by two runs means they did not share images and seeds, and is refused."""
    import json

    runs = {
        "a": [_row("t", 1000, "dps", {}, [{"zeta": 0.1, "train PSNR": 17.0}, {"zeta": 0.2, "train PSNR": 17.5}]),
              _row("t", 1000, "dsg+dps", {"interval": 5}, [{"rate": 0.2, "train PSNR": 17.4}]),
              _row("t", 20, "dsg+ugd", {"interval": 1, "backward_lr": 0.3}, [{"rate": 0.5, "train PSNR": 19.0}])],
        "b": [_row("t", 1000, "dsg+dps", {"interval": 10}, [{"rate": 0.2, "train PSNR": 16.0},
                                                            {"rate": 0.4, "train PSNR": 17.6}]),
              _row("t", 1000, "dps", {}, [{"zeta": 0.2, "train PSNR": 17.5}])],
    }
    for name, rows in runs.items():
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(sweep, "_result", lambda name: tmp_path / name)
    monkeypatch.setitem(sweep.PROFILES, "a", {"k": 128, "models": "quick"})
    monkeypatch.setitem(sweep.PROFILES, "b", {"k": 128, "models": "quick"})
    res = sweep.combine(["a", "b"])
    assert res["tuned"] == {"t": {1000: {"dps": {"zeta": 0.2}, "dsg+dps": {"interval": 10, "rate": 0.4}},
                                  20: {"dsg+ugd": {"interval": 1, "backward_lr": 0.3, "rate": 0.5}}}}
    by_method = {r["method"]: r for r in res["rows"]}
    assert by_method["dps"]["points tried"] == 2  # zeta 0.2 in both runs counts once
    assert by_method["dsg+dps"]["points tried"] == 3 and by_method["dsg+dps"]["from"] == "b"

    runs["b"][1]["scores"][0]["train PSNR"] = 17.3  # the same point, another score
    (tmp_path / "b").write_text(json.dumps({"rows": runs["b"]}))
    with pytest.raises(ValueError, match="not comparable"):
        sweep.combine(["a", "b"])
    monkeypatch.setitem(sweep.PROFILES, "b", {"k": 32, "models": "quick"})
    with pytest.raises(ValueError, match="differ in images"):
        sweep.combine(["a", "b"])


def test_the_dps_and_dsg_defaults_are_the_crn_best_choices(sweep, monkeypatch):
    """condiff/guidance/defaults.py holds what ``--profile crn-best`` chose (its recorded result): a
    default edited by hand, or a sweep result not carried into the table, fails here."""
    import json

    from condiff.guidance.defaults import TUNED

    chosen = json.loads(sweep._result("crn-best").read_text())["tuned"]
    assert chosen, "crn-best chose nothing"
    for task, by_steps in chosen.items():
        for steps, methods in by_steps.items():
            for method, hp in methods.items():
                assert TUNED[task][int(steps)][method] == hp, (task, steps, method)


def test_a_mistyped_task_is_refused_before_anything_runs(sweep, monkeypatch):
    """SWEEP_TASKS=nosuch ran no task and recorded the empty sweep over the last one in BENCHMARKS.md."""
    monkeypatch.setenv("SWEEP_TASKS", "digits/inpaint-random,nosuch")
    monkeypatch.setattr(sweep, "ensure_model", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ValueError, match=r"SWEEP_TASKS: unknown task\(s\) \['nosuch'\]; expected some of"):
        sweep.run("quick")
