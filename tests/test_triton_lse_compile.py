"""The Triton LSE and sigmoid-pair kernels compiled for sm_90 without a GPU
(benchmarks/triton_sm90_resources.py).

The interpreter runs the kernels' logic but not their typing, code generation or register
allocation.  This compiles the forward and strip-gradient kernels at the default launch shape
(``_config``) for the flag combinations the launchers use, and reads the cubin: no spills (no
local memory, no STL/LDL in the SASS) at the default shape, and for bf16/fp16 the dots on Hopper's
warpgroup MMA (``HGMMA``).  It runs in a subprocess because the test session sets
TRITON_INTERPRET=1 before the kernels are defined."""
import functools
import json
import os
import pathlib
import sys

import pytest

import _background
from fastcl.ops.dispatch import triton_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _resources(name: str, *flags: str) -> list:
    """benchmarks/triton_sm90_resources.py's JSON rows for ``flags``, compiled in a subprocess with
    the launch-shape environment variables unset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTCL_TRITON_TILE", "FASTCL_TRITON_BWD")}
    out = pathlib.Path(_background.workdir()) / f"{name}.json"
    proc = _background.run([sys.executable, str(ROOT / "benchmarks" / "triton_sm90_resources.py"), *flags,
                            "--json", str(out)], env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


_background.job("triton-sm90:lse-exact", functools.partial(_resources, "lse-exact"))
_background.job("triton-sm90:lse-shared", functools.partial(_resources, "lse-shared", "--shared-exp"))
_background.job("triton-sm90:others", functools.partial(_resources, "others", "--others"))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("exp_mode", [
    pytest.param("exact", marks=pytest.mark.background("triton-sm90:lse-exact")),
    pytest.param("shared", marks=pytest.mark.background("triton-sm90:lse-shared")),  # opt-in mode
])
def test_lse_kernels_compile_for_sm90_without_spills(exp_mode):
    # "shared" (FASTCL_TRITON_EXP=shared) spilled until its exact fallbacks stopped holding the
    # score tile next to their shared-exp result.
    kernels = _background.result(f"triton-sm90:lse-{exp_mode}")
    assert len(kernels) == 2 * (4 + 1 + 1) + 4  # and the forward's ragged-size variant for bf16
    for k in kernels:
        assert k["local"] == 0 and k["spill_ops"] == 0, f"register spills at the default launch shape: {k}"
        assert k["programs_per_sm"] >= 1, k
        if k["dtype"] in ("bf16", "fp16"):
            assert k["hgmma"] > 0, f"half dots not on the warpgroup MMA: {k}"
        if k["kernel"].startswith("fwd"):
            # The per-tile column logs on the hardware log2: libdevice's exact one took about 30
            # instructions a value, a third of the rows+cols forward's code.
            assert k["mufu_lg2"] > 0, f"forward without the hardware log2: {k}"
    # 1744 now (whole tiles), 1840 at 430df25 (Triton 3.6), 2784 before fb89540
    ceiling = {("fwd", True, True, False): 2300, ("fwd/ragged", True, True, False): 2300}
    for k in kernels:
        top = ceiling.get((k["kernel"], k["rows"], k["cols"], k["diag"]))
        if exp_mode == "exact" and k["dtype"] == "bf16" and top is not None:
            assert k["instrs"] <= top, f"the epilogue grew back (SASS instructions): {k}"


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.background("triton-sm90:others")
def test_sigmoid_and_fused_gradient_kernels_compile_for_sm90_without_spills():
    """The sigmoid-pair kernels in the modes ``sigmoid_mode`` picks (fp32 takes the strip kernels:
    its fused ones spilled by the tens of thousands of instructions) and the opt-in fused LSE
    gradient kernel: they compile, keep to registers, and half dots run on tensor cores."""
    kernels = _background.result("triton-sm90:others")
    assert {(k["kernel"], k["dtype"]) for k in kernels} >= {("sigmoid_fwd", "bf16"), ("sigmoid_bwd_rows", "fp16"),
                                                             ("sigmoid_grad_strip", "fp32"), ("lse_grad_fused", "bf16")}
    assert all(k["mode"] == "strip" for k in kernels if k["dtype"] == "fp32" and k["kernel"].startswith("sigmoid"))
    # Softplus by a series, not libdevice's log (19c7392): SASS instructions at the pinned Triton
    # were 1368 and 2576 after, 2056 and 3992 before.
    ceiling = {("sigmoid_fwd", "bf16", 128): 1700, ("sigmoid_fwd_chunked", "bf16", 768): 3200}
    for k in kernels:
        assert k["local"] == 0 and k["spill_ops"] == 0, f"register spills: {k}"
        assert k["programs_per_sm"] >= 1, k
        if k["dtype"] in ("bf16", "fp16"):
            assert k["hgmma"] + k["hmma"] > 0, f"half dots not on tensor cores: {k}"
        top = ceiling.get((k["kernel"], k["dtype"], k["D"]))
        assert top is None or k["instrs"] <= top, f"the epilogue grew back (SASS instructions): {k}"
