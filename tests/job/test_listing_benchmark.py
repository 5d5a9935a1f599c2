"""benchmarks/listing.py runs end to end at tiny sizes: its own SeaweedFS, the S3 listing at two
parallelisms (which must list the same keys), both synthetic nights and their table."""

from __future__ import annotations

import pytest

from .conftest import benchmark_module


@pytest.mark.slow
def test_listing_benchmark_smoke(tmp_path, capsys):
    with benchmark_module("listing") as listing:
        assert listing.main(["--s3-keys", "1500", "--parallelism", "1,4", "--keys", "20000",
                             "--tmp", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "list_inputs, listing.parallelism=4" in out and "keys per CPU s" in out
    assert "0.02M keys, first night (no state)" in out and "0.0202M keys, second night (+1% new)" in out
    assert "200 new, 20,000 already done, 0 deleted" in out
