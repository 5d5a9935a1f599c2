"""benchmarks/night.py runs end to end at a tiny size, and its nights are what they claim to be:
nothing tagged and no model on a night without work, exactly the 3 new images on the next."""

from __future__ import annotations

from .conftest import benchmark_module


def test_night_benchmark_smoke(tmp_path, capsys):
    with benchmark_module("night") as night:
        night.main(["--n", "40", "--repeats", "1", "--tmp", str(tmp_path)])
    rows = {line.split("|")[0].strip(): line for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert "no model; tagged 0 of 40 listed" in rows["nothing to do, 40 listed"]
    assert "model loaded; tagged 3 of 43 listed" in rows["3 new images"]
    assert "no model; tagged 43 of 43 listed" in rows["threshold change (all re-decided)"]
