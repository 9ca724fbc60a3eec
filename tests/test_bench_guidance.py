"""The guidance benchmark's row cache reuses a row only under the code that made it (benchmarks/guidance.py)."""



def _bench(monkeypatch, tmp_path, bench_module):
    bench = bench_module("guidance")
    monkeypatch.setattr(bench, "runs_dir", lambda: tmp_path)
    return bench


def test_row_cache_round_trips_and_misses_under_other_code(bench_module, monkeypatch, tmp_path):
    bench = _bench(monkeypatch, tmp_path, bench_module)
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


def test_source_hash_follows_the_code_but_not_the_defaults_table(bench_module, monkeypatch, tmp_path):
    bench = _bench(monkeypatch, tmp_path, bench_module)
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


def test_target_notes_name_a_gap_within_one_standard_error_as_a_tie(bench_module, monkeypatch):
    bench = bench_module("guidance")

    task = next(iter(bench.TASKS))
    base = [0.0, 2.0, 4.0, 6.0]
    rows = [{"task": task, "method": "dps", "steps": s, "PSNR": 20.0, "per-image PSNR": [20 + v for v in base]}
            for s in (50, 1000)]
    # at 50 steps the gap is +1.0 with SE 0.0 (every image 1 dB ahead); at 1000 it is +0.05 with SE 0.69
    rows += [{"task": task, "method": "dsg+dps", "steps": 50, "PSNR": 21.0,
              "per-image PSNR": [21 + v for v in base]},
             {"task": task, "method": "dsg+dps", "steps": 1000, "PSNR": 20.05,
              "per-image PSNR": [20 + v + d for v, d in zip(base, (1.3, -1.1, 1.2, -1.2))]}]
    notes = [n for n in bench.targets(rows) if "PSNR gap" in n]
    assert len(notes) == 1
    assert "50: +1.00 (SE 0.00), 1000: +0.05 (SE 0.69)" in notes[0]
    assert "beats DPS at every budget: met (within one SE of a tie at 1000 steps)" in notes[0]
    assert "gap widens as steps shrink: met" in notes[0]
