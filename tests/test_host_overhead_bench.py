"""benchmarks/host_overhead.py: its options refuse bad values by name, and a tiny report has
both timings per loss (the ratio is derived from them)."""
import pathlib

import pytest

from conftest import load_module
from fastcl._ext import extension_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_bench():
    return load_module("host_overhead", ROOT / "benchmarks" / "host_overhead.py")


@pytest.mark.parametrize("args, name", [(["--steps", "0"], "--steps"), (["--rounds", "-1"], "--rounds"),
                                        (["--steps", "two"], "--steps"), (["--backend", "gpu"], "--backend")])
def test_bad_options_are_refused_by_name(args, name, capsys):
    with pytest.raises(SystemExit):
        load_bench().main(args)
    assert name in capsys.readouterr().err


@pytest.mark.skipif(not extension_available(), reason="needs the C++ extension (cpu backend)")
def test_report_rows():
    rows = load_bench().host_report("cpu", steps=10, rounds=1)
    assert [r["loss"] for r in rows] == ["clip", "siglip"]
    for r in rows:
        assert r["eager_us"] > 0 and r["custom_op_us"] > 0 and r["ratio"] == r["custom_op_us"] / r["eager_us"]
