"""``condiff show``: what a run, a model or a checkpoint directory holds, and how far its training got.

    condiff show runs/digits          # a run: its settings, models, progress, results, notes
    condiff show runs                 # a folder of runs: one line per run below it
    condiff show runs/digits/model    # a model or a checkpoint directory alone
    condiff show runs/digits --json   # the same as one JSON object per path

It only reads: it takes no lock (it probes, for an instant, whether another command holds one), runs
no file of one's own and loads no weights (parameters are counted from the safetensors headers), so it
works on a run that another command is writing, and on one from elsewhere. A training that stopped
before its last step is shown with the step it reached and how to go on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from safetensors import safe_open

from .. import io
from ..models import is_diffusers_dir
from ..train import list_checkpoints, read_log
from ..userfile import file_sha256, is_trusted, split_file_spec
from .common import json_table, run_kind

# directories of a run that hold one training's internals or a kept run, never a training of their own
_INTERNAL = {"checkpoints", "model", "mirror", io.REPLACED}
_WEIGHTS = ("model", "mirror")  # a training's finished weights: model/ (a diffusion model), mirror/ (a NAMM map)
_METRICS_SHOWN = 6
_SAMPLE_ORDER = ("n", "steps", "eta", "seed", "label", "guidance_scale", "batch_size")
# a metrics.json's words shown beside its figures, n among them (figures of a few samples are noise)
_ABOUT = ("method", "task", "label", "ckpt", "n")
# metrics.json keys that are settings of the command, not figures (shown last); and words of the figures shown first
_SETTING_KEYS = {"batch_size", "eta", "seed", "steps", "n", "guidance_scale", "label", "grad_evals", "nfe", "mmd_n",
                 "tolerance", "slack_tolerance", "finish", "l_max", "interval", "rate", "zeta", "final"}
_SCORE_WORDS = ("ratio", "mean", "median", "psnr", "ssim", "frechet", "mmd", "reduction", "success", "iou", "gap",
                "tv", "memoris", "error", "accuracy", "prob", "residual")
# how to go on with an unfinished training, by the command that made the run
_GO_ON = {"condiff train": "condiff train --out {run} --resume",
          "condiff dual train": "condiff dual train --out {run} --resume",
          "condiff namm fit": "condiff namm fit --out {run} --resume",
          "(dual experiment)": "the `condiff dual` experiment that made it, run again with --out {run}"}
_STAGE_ORDER = ("namm", "mdm", "vanilla", "finetune")  # a NAMM run's trainings, in the order they are made
_LIST_DEPTH = 3  # how deep `condiff show FOLDER` looks for runs


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="say what a run, model or checkpoint directory holds and how far it got",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="a run, model or checkpoint directory, or a folder of runs")
    p.add_argument("--json", action="store_true", help="print one JSON object per path instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed, shown = 0, 0
    for p in args.paths:  # each path that reads is shown; one that does not is an error line, and the exit is 2
        try:
            if not str(p).strip():  # Path("") is the current folder, which the user did not name
                raise ValueError("an empty path was given")
            d = describe(p)
        except (OSError, ValueError) as e:
            print(f"condiff show: error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(io.no_nan(d), sort_keys=True))
        else:
            print(("\n" if shown else "") + "\n".join(render(d)))
        shown += 1
    return 2 if failed else 0


# --- reading ------------------------------------------------------------------------------------------------


def describe(path: str | Path) -> dict:
    """What ``path`` is and holds, as a JSON-able table: a run (``kind`` is the command that wrote it), a model or
    checkpoint directory (``kind`` "model" / "checkpoint"), or a folder of runs (``kind`` "folder", ``runs``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_dir():
        raise ValueError(f"{p} is a file; condiff show takes a run, model or checkpoint directory, or a folder of runs")
    if is_diffusers_dir(p):
        unet = p / "unet" if (p / "unet").is_dir() else p
        files = sorted(unet.glob("*.safetensors"))
        sizes = [_count(f) for f in files]
        return {"path": str(p), "kind": "diffusers model", "format": "diffusers",
                "net": str(json_table(unet / "config.json").get("_class_name", "a diffusers model")),
                "parameters": sum(sizes) if files and None not in sizes else None, "own_code": []}
    cfg = json_table(p / io.CONFIG)
    if cfg.get("format") or {"step", "optim"} <= set(cfg):  # a model directory (any format) or a checkpoint
        out = {"path": str(p), "kind": "checkpoint" if "optim" in cfg else "model", **_weights(p, cfg)}
        if "optim" in cfg:
            out["state"] = f"step {cfg.get('step')} of {_table(cfg, 'train').get('steps', '?')}"
        out["own_code"] = _own_code(cfg)
        return out
    kind = _kind(p)
    if kind is None and not _holds_training(p):
        runs = [{**describe_run(q, short=True), **({"link_to": str(q.resolve())} if q.is_symlink() else {})}
                for q in _runs_below(p)]  # a run linked in beside its target would read as two runs
        if not runs:
            raise ValueError(f"{p} is not a condiff run, model or checkpoint directory, and holds no run")
        return {"path": str(p), "kind": "folder", "runs": runs}
    return describe_run(p, kind)


def _finetune_settings(p: Path, cfg: dict) -> list[str] | None:
    """The ``--set`` flags of the settings NAMM run ``p``'s fine-tuning stage was begun with where its
    ``config.json`` (``cfg``, recorded when a stage finishes) says otherwise: ``namm finetune`` has no
    --resume, and goes on with a stage only under the settings it was begun with. None where no flags
    can (a stage it is made from has changed since: :func:`condiff.cli.namm.finetune_flags`)."""
    from .namm import finetune_flags

    spec = json_table(p / "finetune" / "stage.json").get("spec")
    if not isinstance(spec, dict):
        return []
    now = {k: spec[k] if k == "constraint" else cfg.get(k) for k in spec}  # (the counter's recipe: not in cfg)
    now["sampler"] = {k: _table(cfg, "sample").get(k) for k in _table(spec, "sampler")}
    return finetune_flags(spec, now)


def _kind(p: Path) -> str | None:
    """What made run ``p``: its recorded command, else what its files say (a NAMM stage, a dual experiment cut
    short, a run just begun); None for a folder that shows no run of its own."""
    kind = run_kind(p)
    if kind is None and (p / "stage.json").is_file() and run_kind(p.parent) == "condiff namm fit":
        return "(namm stage)"
    if kind is None and any((q / "key.json").is_file() for q in _subdirs(p)):  # marked once it finishes
        return "(dual experiment)"
    if kind is None and _just_begun(p):
        return "(just begun)"
    return kind


def _just_begun(p: Path) -> bool:
    """A run a command has claimed (its ``.lock``) and not yet written anything of (no mark, settings or
    checkpoint yet), or a NAMM or dual experiment's first model (``key.json``, ``stage.json``)."""
    return (p / ".lock").is_file() or (p / "key.json").is_file() or (p / "stage.json").is_file()


def describe_run(p: Path, kind: str | None = None, short: bool = False) -> dict:
    kind = kind or _kind(p) or "(unrecorded command)"
    cfg = json_table(p / io.CONFIG)
    out: dict = {"path": str(p), "kind": kind, "settings": _settings(cfg)}
    units = _units(p)
    trainings = [_unit(u, log=not short) for u in units]  # a listing's line shows no log
    out["trainings"] = {_rel(u, p): {k: v for k, v in t.items() if k != "configs"} for u, t in zip(units, trainings)}
    out["state"] = _run_state(trainings)
    if kind == "condiff namm fit":  # the stages its fit makes: one not begun yet leaves the run unfinished
        made = {u.name for u in units}
        out["not_made"] = [s for s in ("namm", "mdm") + (("vanilla",) if cfg.get("baseline") else ()) if s not in made]
        if out["not_made"]:
            out["state"] = "unfinished"
        if "finetune" in out["trainings"]:  # begun by `namm finetune --set ...`: going on needs those settings
            out["trainings"]["finetune"]["begun_with"] = _finetune_settings(p, cfg)
    if short:
        return out
    out["results"], out["about"] = _results(p)
    notes = []
    holder = io.run_holder(p)
    if holder is not None:
        notes.append(f"being written now by process {holder}")
    if kept := io.kept_names(p):
        back = (f"; `{kind} --out {p} --restore` puts it back" if kind in ("condiff train", "condiff dual train")
                else "")  # (a --fresh stopped before its first checkpoint shows no training to go on with)
        notes.append(f"{p / io.REPLACED} keeps the run an unfinished --fresh / --retrain replaced ({', '.join(kept)}); "
                     f"it is deleted when the replacement finishes (README, 'Run directories'){back}")
    if kind == "condiff namm fit":
        notes += _namm_stale(p)
    notes += [f"{(q / data).relative_to(p)} has no record beside it (a command stopped while moving its results "
              "in): run that command again" for q, data in _unrecorded(p)]
    notes += _damaged(p, units)
    out["notes"] = notes
    out["own_code"] = _own_code(cfg, *(c for t in trainings for c in t["configs"]))
    return out


# a NAMM run's stages made from others (whose settings are part of theirs), and how each is made again
_NAMM_UPSTREAM = {"mdm": ("namm",), "finetune": ("namm", "mdm")}
_NAMM_REDO = {"mdm": "condiff namm fit --out {run} --resume --fresh",
              "finetune": "condiff namm finetune --run {run} --fresh"}


def _namm_stale(p: Path) -> list[str]:
    """Notes on the stages and results of NAMM run ``p`` made from a stage that has since been made again with
    other settings (a --fresh, a fit with other settings): they describe the stage it replaced. A stage's settings
    hold those of the stages it is made from; a result records the stages it used (``made_from``)."""
    from .namm import comparable, spec_digest

    specs = {s: json_table(p / s / "stage.json").get("spec") for s in ("namm", "mdm", "vanilla", "finetune")}
    notes = []
    for down, ups in _NAMM_UPSTREAM.items():
        d = specs[down]
        gone = [u for u in ups if isinstance(d, dict) and isinstance(specs[u], dict)
                and comparable({k: d.get(k) for k in specs[u]}) != comparable(specs[u])]
        if gone:
            notes.append(f"{down}/ was made from another {', '.join(f'{u}/' for u in gone)} than the one there now: "
                         f"it describes what that replaced ({_NAMM_REDO[down].format(run=p)} makes it again)")
    stale = bool(notes)  # stages to make again before the results made from them
    extra = sorted(q.name for q in p.glob("assimilate?*") if q.is_dir())  # `namm assimilate --out RUN/assimilate-x`
    for res in ("samples", "assimilate", *extra):
        table = json_table(p / res / "metrics.json")
        made = table.get("made_from")
        if not isinstance(made, dict):
            continue  # none recorded (a result written before it was)
        gone = [s for s in _STAGE_ORDER if s in made and (not isinstance(specs.get(s), dict)
                                                          or spec_digest(specs[s]) != made[s])]
        for s in (s for s in made if s.startswith("samples/")):  # the sample sets a report was drawn from
            rec = json_table(p / s / "stage.json")
            if not rec.get("done") or spec_digest(rec.get("spec")) != made[s]:
                gone.append(s)
        if gone:
            first = " once the stages above are made again" if stale else ""
            notes.append(f"{res}/metrics.json was made from another {', '.join(f'{s}/' for s in gone)} than the "
                         f"one there now ({_namm_redo_result(p, res, table)} makes it again{first})")
    return notes


def _namm_redo_result(p: Path, res: str, table: dict) -> str:
    """The command that makes a NAMM run's samples/ or assimilate/ results again as they were asked for (the
    sets, their size, the observation and methods its metrics.json records)."""
    if res == "samples":
        sets = [k for k in table if isinstance(table[k], dict)
                and k not in ("data (held-out)", "made_from", "versions")]
        n = next((table[k].get("n") for k in sets if isinstance(table[k].get("n"), int)), None)
        flags = ([f"--n {n}"] if n else []) + ([] if "mdm_ft" in sets else ["--no-finetuned"]) + (
            ["--guided"] if "guided" in sets else [])
        return " ".join([f"condiff namm sample --run {p}", *flags])
    methods = table.get("methods") if isinstance(table.get("methods"), dict) else {}
    obs = (table.get("settings") or {}).get("obs") if isinstance(table.get("settings"), dict) else None
    flags = ([f"--obs {obs}"] if isinstance(obs, str) else []) + (["--no-baselines"] if list(methods) == ["mirror DPS"]
                                                                   else [])
    out = [] if res == "assimilate" else [f"--out {p / res}"]
    return " ".join([f"condiff namm assimilate --run {p}", *flags, *out])


def _settings(cfg: dict) -> dict:
    """The few settings that say what a run is: its data, constraint, model and training budget."""
    out = {}
    data = _table(cfg, "data")
    if data.get("name"):
        out["data"] = str(data["name"]) + (" (labelled)" if data.get("labels") else "")
    con = data.get("constraint")
    if con:
        out["constraint"] = _name(con) if isinstance(con, dict) else str(con)
    if cfg.get("profile"):
        out["profile"] = str(cfg["profile"])
    if _table(cfg, "model").get("name"):
        out["model"] = _name(cfg["model"])
    sch = _table(cfg, "schedule")
    if sch.get("kind"):
        out["schedule"] = f"{sch['kind']}, T {sch.get('T', 1000)}"
    if "steps" in _table(cfg, "train"):
        out["training steps"] = cfg["train"]["steps"]
    dual = ", ".join(f"{k} {v}" for k, v in sorted(_table(cfg, "dual").items()) if not isinstance(v, (dict, list)))
    if dual:
        out["dual"] = dual
    return out


def _table(cfg: dict, key: str) -> dict:
    """``cfg[key]`` where it is a table, else {} (a hand-edited file is shown, not refused)."""
    v = cfg.get(key)
    return v if isinstance(v, dict) else {}


def _name(table: dict) -> str:
    """A named table's name; ``FILE.py:NAME`` for a constraint of one's own."""
    if table.get("name") == "python" and "path" in table:
        return f"{table['path']}:{table.get('attr', '?')}"
    return str(table.get("name"))


def _holds_training(d: Path) -> bool:
    """Whether ``d`` holds a training itself: finished weights (``model/``, ``mirror/``) or checkpoints."""
    return any((d / w / io.CONFIG).is_file() for w in _WEIGHTS) or any((d / "checkpoints").glob("step_*"))


def _units(root: Path) -> list[Path]:
    """The directories at or below ``root`` (two levels) that hold a training (:func:`_holds_training`).
    Hidden directories and a training's internals are not entered."""
    found, level = [], [root]
    for _ in range(3):
        nxt = []
        for d in level:
            if _holds_training(d):
                found.append(d)
            nxt += [q for q in _subdirs(d) if q.name not in _INTERNAL]
        level = nxt
    return sorted(found, key=lambda u: (u != root, _STAGE_ORDER.index(u.name) if u.name in _STAGE_ORDER else 9, u))


def _subdirs(d: Path) -> list[Path]:
    """The folders in ``d`` (:func:`condiff.io.subdirs`: not through links), sorted, hidden ones left out."""
    return sorted(q for q in io.subdirs(d) if not q.name.startswith("."))


def _runs_below(p: Path) -> list[Path]:
    """The runs in folder ``p``, down to :data:`_LIST_DEPTH` levels; a run's own folders are not entered. A
    link to a run is listed (a run kept elsewhere, linked in); other links are not followed."""
    found, level = [], [p]
    is_run = lambda q: run_kind(q) is not None or _holds_training(q) or _just_begun(q)  # noqa: E731
    for _ in range(_LIST_DEPTH):
        nxt = []
        for d in level:
            for q in _subdirs(d):
                (found if is_run(q) else nxt).append(q)
            found += [q for q in _linked_dirs(d) if is_run(q)]
        level = nxt
    return sorted(found)


def _linked_dirs(d: Path) -> list[Path]:
    """The links to folders in ``d``, hidden ones left out (and links in a loop)."""
    def to_folder(e: os.DirEntry) -> bool:
        try:
            return e.is_symlink() and e.is_dir() and not e.name.startswith(".")
        except OSError:  # a loop of links
            return False

    with contextlib.suppress(OSError), os.scandir(d) as it:
        return [Path(e.path) for e in it if to_folder(e)]
    return []


def _rel(u: Path, root: Path) -> str:
    return "." if u == root else str(u.relative_to(root))


def _unit(u: Path, log: bool = True) -> dict:
    """One training: its finished weights, its newest checkpoint, its last log line (with ``log``) and its state."""
    out: dict = {}
    configs = []  # what names files of one's own: the weights', the newest checkpoint's and the stage's settings
    for w in _WEIGHTS:
        if (u / w / io.CONFIG).is_file():
            configs.append(json_table(u / w / io.CONFIG))
            out[w] = _weights(u / w, configs[-1])
    steps = list_checkpoints(u / "checkpoints")
    if steps:
        c = json_table(steps[-1] / io.CONFIG)
        out["checkpoint"] = {"name": steps[-1].name, "step": c.get("step"), "of": _table(c, "train").get("steps")}
        configs.append(c)
    last = _last_log(u / "log.jsonl") if log else None
    if last:
        out["last_log"] = last
    stage = json_table(u / "stage.json")
    configs.append(stage)
    done = [s if isinstance(s := out[w].get("steps"), int) else 0 for w in _WEIGHTS if w in out]
    ck = out.get("checkpoint", {})
    at = ck.get("step") if isinstance(ck.get("step"), int) else 0
    if stage:
        state = "finished" if stage.get("done") else "unfinished"
    elif done and (not at > max(done) or (max(done) == 0 and isinstance(ck.get("of"), int) and at >= ck["of"])):
        state = "finished"  # (weights saved from Python without their step count: finished if training was)
    elif ck:
        state = "unfinished"
    else:
        state = "empty"
    if state == "unfinished" and ck:
        state += (f" at step {ck['step']} of {ck.get('of') or '?'}" if isinstance(ck.get("step"), int)
                  else f" (its newest checkpoint, {ck['name']}, does not read)")
    out["state"] = state
    out["configs"] = configs
    return out


def _run_state(trainings: list[dict]) -> str:
    states = [t["state"] for t in trainings]
    if not states:
        return "no training"
    if all(s == "finished" for s in states):
        return "finished"
    return "unfinished" if any(s.startswith("unfinished") for s in states) else "partly made"


def _weights(d: Path, cfg: dict | None = None) -> dict:
    """A model (or mirror-map) directory: its net, parameter count, steps and training time, from its files
    (``cfg``: its config.json, where the caller has read it)."""
    cfg = json_table(d / io.CONFIG) if cfg is None else cfg
    out: dict = {"format": cfg.get("format", "condiff checkpoint" if "optim" in cfg else None)}
    net = cfg.get("net") if isinstance(cfg.get("net"), dict) else None
    if net:
        out["net"] = _name(net)
    elif isinstance(cfg.get("mirror"), dict):
        m = cfg["mirror"]
        out["net"] = f"mirror map: psi {_name(_table(m, 'psi'))}, inverse {_name(_table(m, 'inverse'))}"
    for key in ("steps", "train_seconds"):
        if key in cfg:
            out[key] = cfg[key]
    if "step" in cfg:
        out["steps"] = cfg["step"]
    if isinstance(cfg.get("shape"), list):
        out["shape"] = cfg["shape"]
    files = sorted(d.glob("*.safetensors"))
    model_file = d / "model.safetensors"
    if model_file.is_file():
        out["parameters"] = _count(model_file)
    out["bytes"] = sum(_size(f) for f in files)
    return out


def _size(f: Path) -> int:
    try:
        return f.stat().st_size
    except OSError:  # a dangling link
        return 0


def _count(f: Path) -> int | None:
    """The number of values in a safetensors file, from its header, no tensor read (None where it does not open)."""
    try:
        with safe_open(f, framework="pt") as s:
            return sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys())
    except Exception:  # a torn or foreign file (SafetensorError, OSError): no count, not a failure
        return None


def _last_log(f: Path) -> dict | None:
    """The last record of a ``log.jsonl`` (:func:`condiff.train.read_log`: torn and garbled lines skipped)."""
    try:
        rows = [r for r in read_log(f) if isinstance(r, dict)]
    except OSError:
        return None
    return rows[-1] if rows else None


def _results(p: Path) -> tuple[dict, dict]:
    """The ``metrics.json`` files of a run (its own and its results' folders, three levels down), and the
    ``sample_config.json`` of ``condiff sample``'s folders, each read once: its numbers, flattened to dotted keys,
    figures first; and its top-level words (the method, the task, the model it scored), which name a result where
    its numbers do not."""
    figures, about = {}, {}
    samples = [q / "sample_config.json" for q in _result_folders(p) if (q / "sample_config.json").is_file()]
    for f in sorted([*_metric_files(p), *samples]):
        table, name = json_table(f), str(f.relative_to(p))
        words = {k: str(v) for k, v in table.items() if k in _ABOUT and (isinstance(v, str) or (
            isinstance(v, int) and not isinstance(v, bool)))}  # a class label is an int, as is n
        if flat := {k: v for k, v in _numbers(table).items() if k not in words}:  # (n: said with the words)
            order = ((lambda k: _SAMPLE_ORDER.index(k) if k in _SAMPLE_ORDER else len(_SAMPLE_ORDER))
                     if f.name == "sample_config.json" else _rank)  # a sample's settings: how many, how drawn
            figures[name] = dict(sorted(flat.items(), key=lambda kv: order(kv[0])))
        if words:
            about[name] = words
    return figures, about


def _rank(key: str) -> int:
    """0 for a figure (a score word in its name), 1 for another number, 2 for a setting the command recorded."""
    last = key.rsplit(".", 1)[-1]
    if last in _SETTING_KEYS or key.startswith("hyperparameters."):
        return 2
    return 0 if any(w in key.lower() for w in _SCORE_WORDS) else 1


_RESULT_DATA = ("samples.npz", "reconstruction.npz", "masks.npz", "tours.npz")  # what a command's record describes


def _unrecorded(p: Path) -> list[tuple[Path, str]]:
    """The folders of a run (:func:`_result_folders`) that hold a command's results without their record
    (``metrics.json``, ``sample_config.json``): what a stop during the final moves of
    :func:`condiff.io.writing_outputs` leaves."""
    found = []
    for q in _result_folders(p):
        data = next((d for d in _RESULT_DATA if (q / d).is_file()), None)
        if data and not any((q / r).is_file() for r in ("metrics.json", "sample_config.json", "stage.json")):
            found.append((q, data))  # (stage.json: namm's sample sets)
    return found


def _damaged(p: Path, units: list[Path]) -> list[str]:
    """Notes on the files show reads that do not read (torn, edited, or of another program): the run's settings,
    its results' records, and its finished weights (their settings and tensor files). Without them the lines those
    files feed would just be missing, and a damaged run would read as finished."""
    tables = [p / io.CONFIG, *_metric_files(p), *(q / "sample_config.json" for q in _result_folders(p)),
              *(u / w / io.CONFIG for u in units for w in _WEIGHTS)]
    notes = []
    for f in tables:
        if f.is_file():
            try:
                io.read_json_table(f)
            except (OSError, ValueError) as e:
                why = "not a table of settings" if "does not hold a table" in str(e) else "not valid JSON"
                notes.append(f"{f.relative_to(p)} does not read ({why}): what it records is not shown")
    for u in units:
        for w in _WEIGHTS:
            for f in sorted((u / w).glob("*.safetensors")) if (u / w / io.CONFIG).is_file() else ():
                if f.is_file() and _count(f) is None:  # (a dangling link: no weights of the model's own)
                    notes.append(f"{f.relative_to(p)} does not open (torn, or not a safetensors file): the weights "
                                 "are damaged")
    return notes


def _metric_files(p: Path) -> list[Path]:
    return [q / "metrics.json" for q in _result_folders(p) if (q / "metrics.json").is_file()]


def _result_folders(p: Path, depth: int = 3) -> list[Path]:
    """``p`` and its folders down to ``depth`` levels, a training's internals and hidden folders left out."""
    found = [p]
    if depth:
        for q in _subdirs(p):
            if q.name not in _INTERNAL:
                found += _result_folders(q, depth - 1)
    return found


def _numbers(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def _file_spec(name: object) -> tuple[str, str] | None:
    """``(FILE, NAME)`` of a ``FILE.py:NAME`` name (:func:`condiff.userfile.split_file_spec`), else None (also for
    a hand-edited one that does not read, which is shown, not refused)."""
    try:
        return split_file_spec(name) if isinstance(name, str) else None
    except ValueError:
        return None


def _own_code(*configs: dict) -> list[dict]:
    """The files of one's own that the settings name (a net's ``FILE.py:NAME``, a constraint's ``path``), with
    whether each is there, as it was used (its recorded SHA-256), and trusted here."""
    named: dict[str, set[str]] = {}  # path -> the SHA-256 each config records for it

    def note(path: str, sha: object) -> None:
        named.setdefault(path, set()).update([sha] if isinstance(sha, str) else [])

    def walk(x: object) -> None:
        if isinstance(x, dict):
            name = x.get("name")
            if spec := _file_spec(name):
                note(spec[0], x.get("file_sha256"))
            elif name == "python" and isinstance(x.get("path"), str):
                note(x["path"], x.get("file_sha256"))
            con, data = x.get("constraint"), x.get("data")
            if isinstance(con, dict) and isinstance(data, dict) and isinstance(data.get("constraint"), dict):
                path = data["constraint"].get("path")  # a NAMM stage's settings: the constraint file's SHA-256
                if isinstance(path, str) and con.get("file_sha256"):
                    note(path, con["file_sha256"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for c in configs:
        walk(c)
    out = []
    for path, recorded in sorted(named.items()):
        f = Path(path)
        entry: dict = {"path": path}
        if not f.is_file():
            entry["state"] = "missing"
        else:
            sha = file_sha256(f)
            entry["state"] = ("as used" if not recorded or sha in recorded else "edited since it was used") + (
                "; trusted here" if is_trusted(f, sha) else f"; not trusted here: condiff trust {f}")
        out.append(entry)
    return out


# --- writing ------------------------------------------------------------------------------------------------


def render(d: dict) -> list[str]:
    """The text of one :func:`describe` table."""
    if d["kind"] == "folder":
        lines = [f"{d['path']}: {len(d['runs'])} run{'s' if len(d['runs']) != 1 else ''}"]
        width = max(len(_short(r["path"], d["path"])) for r in d["runs"])
        for r in d["runs"]:
            what = ", ".join(f"{k} {v}" for k, v in r["settings"].items() if k in ("data", "constraint", "model"))
            state = r["state"] if r["trainings"] else ""
            link = f" (a link to {r['link_to']})" if "link_to" in r else ""
            lines.append(f"  {_short(r['path'], d['path']):<{width}}  {r['kind']:<20} {state:<12} {what}".rstrip()
                         + link)
        return lines
    if d["kind"] in ("model", "checkpoint", "diffusers model"):
        lines = [f"{d['path']}: a {d['kind']} directory", f"  {_weights_line(d)}"]
        if d.get("state"):
            lines.append(f"  {d['state']}")
        return lines + _own_code_lines(d.get("own_code", []))
    kind = {"(just begun)": "a run just begun (nothing written yet)",
            "(namm stage)": f"a stage of the NAMM run {Path(d['path']).parent}",
            "(dual experiment)": "a dual experiment's run, cut short (its command is recorded when it finishes)",
            "(unrecorded command)": "a run (its command unrecorded)"}.get(d["kind"], f"{d['kind']} run")
    lines = [f"{d['path']}: {kind}" + (f", {d['state']}" if d["trainings"] else "")]
    if d["settings"]:
        lines.append("  settings: " + "; ".join(f"{k} {v}" for k, v in d["settings"].items()))
    for name, t in d["trainings"].items():
        label = "training" if name == "." else name
        parts = [t["state"]]
        for w in _WEIGHTS:
            if w in t:
                parts.append(f"{w}/: {_weights_line(t[w])}")
        if "checkpoint" in t:
            parts.append(f"newest checkpoint {t['checkpoint']['name']}")
        if "last_log" in t:
            row = t["last_log"]
            losses = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if "loss" in k and isinstance(v, (int, float)))
            if losses:
                parts.append(f"last logged (step {row.get('step', '?')}): {losses}")
        lines.append(f"  {label}: " + "; ".join(parts))
        go_on = _GO_ON.get(d["kind"])
        if d["kind"] == "condiff namm fit" and name == "finetune":  # made by `namm finetune`, not by the fit
            flags = t.get("begun_with", [])  # None: a stage it is made from has changed since
            go_on = " ".join(["condiff namm finetune --run {run}", *(["--fresh"] if flags is None else flags)])
        if t["state"].startswith("unfinished") and go_on:
            lines.append("    to go on: " + go_on.format(run=d["path"]))
    if d.get("not_made"):
        lines.append(f"  not made yet: {', '.join(d['not_made'])}; to go on: "
                     + _GO_ON["condiff namm fit"].format(run=d["path"]))
    for f, nums in d.get("results", {}).items():
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in list(nums.items())[:_METRICS_SHOWN])
        more = len(nums) - _METRICS_SHOWN
        about = ", ".join(f"{k} {v}" for k, v in d.get("about", {}).get(f, {}).items())
        lines.append(f"  {f}: " + (f"[{about}] " if about else "") + shown
                     + (f" (+{more} more there)" if more > 0 else ""))
    lines += _own_code_lines(d.get("own_code", []))
    lines += [f"  note: {n}" for n in d.get("notes", [])]
    return lines


def _weights_line(w: dict) -> str:
    parts = [w.get("net") or w.get("format") or "weights"]
    if w.get("parameters") is not None:
        parts.append(f"{_count_text(w['parameters'])} parameters")
    if "steps" in w:
        parts.append(f"{w['steps']} steps" + (f" in {_fmt(w['train_seconds'])} s" if "train_seconds" in w else ""))
    return ", ".join(parts)


def _own_code_lines(entries: list[dict]) -> list[str]:
    return [f"  code of one's own: {e['path']} ({e['state']})" for e in entries]


def _short(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _count_text(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
