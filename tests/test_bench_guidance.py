"""The guidance benchmark's row cache reuses a row only under the code that made it (benchmarks/guidance.py)."""

import importlib
from pathlib import Path


def _bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("guidance")
    monkeypatch.setattr(bench, "runs_dir", lambda: tmp_path)
    return bench


def test_row_cache_round_trips_and_misses_under_other_code(monkeypatch, tmp_path):
    bench = _bench(monkeypatch, tmp_path)
    monkeypatch.setenv("CONDIFF_BENCH_REUSE", "1")
    cache = bench.RowCache("p")
    key = cache.key("digits/inpaint-random", "dps", 20, {"zeta": 2.0})
    cache.put(key, {"PSNR": 17.5})
    again = bench.RowCache("p")  # a later run reads the file
    assert again.get(key) == {"PSNR": 17.5} and again.reused == 1
    monkeypatch.setattr(bench, "_code_fingerprint", lambda: "other library code")
    assert again.get(again.key("digits/inpaint-random", "dps", 20, {"zeta": 2.0})) is None
    monkeypatch.delenv("CONDIFF_BENCH_REUSE")
    assert bench.RowCache("p").get(key) is None  # off unless asked for


def test_source_hash_follows_the_code_but_not_the_defaults_table(monkeypatch, tmp_path):
    bench = _bench(monkeypatch, tmp_path)
    (tmp_path / "guidance").mkdir()
    (tmp_path / "sample.py").write_text("x = 1\n")
    (tmp_path / "guidance" / "defaults.py").write_text("TUNED = {}\n")
    first = bench.source_hash(tmp_path)
    (tmp_path / "guidance" / "defaults.py").write_text("TUNED = {'a': 1}\n")
    assert bench.source_hash(tmp_path) == first
    (tmp_path / "sample.py").write_text("x = 2\n")
    assert bench.source_hash(tmp_path) != first
    (tmp_path / "sample.py").write_text("x = 1\n")
    assert bench.source_hash(tmp_path) == first and len(first) == 16
