"""Random problems across the fused backends against the float64 reference (slow: not in make test).

Each case draws odd sizes, a dtype, the options of the op and a workspace size, and runs the
``cpu`` kernels, ``triton`` (the interpreter without a GPU) and ``cuda`` (the CUDA kernels
compiled for the CPU, tests/_cuda_host.py, without a GPU) through the same checks as the unit
tests.  ``pytest -m slow tests/test_backend_fuzz.py`` runs 3 x 70 similarity_lse cases and
2 x 30 sigmoid_pair cases."""
import os
import random

import pytest
import torch

import _cuda_host
from conftest import assert_close, fp32_output_tol
from fastcl._ext import extension_available
from fastcl.ops import strips
from fastcl.ops.dispatch import triton_available

pytestmark = pytest.mark.slow


def backends(monkeypatch):
    out = ["cpu"] if extension_available() else []
    if triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    if torch.cuda.is_available():
        out.append("cuda")
    elif _cuda_host.compiler():
        _cuda_host.route_to_host(monkeypatch)
        out.append("cuda")
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_similarity_lse_fuzz(seed, monkeypatch):
    from test_similarity_lse import check_against_reference
    rng = random.Random(seed)
    names = backends(monkeypatch)
    for case in range(70):
        n, m, d = rng.randint(1, 70), rng.randint(1, 140), rng.choice([1, 3, 8, 17, 40, 64])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        rows, cols = rng.choice([(True, True), (True, False), (False, True)])
        offset = rng.choice([None, None, 0, rng.randint(-n, m)])
        positives = rng.choice([False, False, True, "index"])
        if positives is True and m < n:
            positives = False
        if positives == "index":
            positives = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(case))
        monkeypatch.setattr(strips, "WORKSPACE_MB", rng.choice([None, 0.002, 0.01]))
        kw = dict(bias=rng.choice([None, 0.7, -3.0]), offset=offset, rows=rows, cols=cols, positives=positives,
                  scale=rng.choice([1.0, 2.5, 10.0]), seed=seed * 1000 + case)
        for name in names:
            try:
                check_against_reference(name, n, m, d, dtype, **kw)
            except AssertionError as e:
                raise AssertionError(f"{name}, case {case}: n={n} m={m} d={d} {dtype} {kw}: {e}") from e


@pytest.mark.parametrize("seed", [1, 2])
def test_sigmoid_pair_fuzz(seed, monkeypatch):
    from test_sigmoid_pair import _run
    rng = random.Random(seed)
    names = backends(monkeypatch)
    for case in range(30):
        n, m, d = rng.randint(1, 70), rng.randint(1, 140), rng.choice([1, 3, 8, 17, 40, 64, 300])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        g = torch.Generator().manual_seed(seed * 1000 + case)
        q = (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype)
        k = (torch.randn(m, d, generator=g) / d ** 0.5).to(dtype)
        scale, bias = torch.tensor(rng.choice([1.0, 10.0])), torch.tensor(rng.choice([0.0, -10.0, 3.0]))
        monkeypatch.setattr(strips, "WORKSPACE_MB", rng.choice([None, 0.002, 0.01]))
        mode = rng.choice(["auto", "fused", "strip"])
        monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
        for name in names:
            outs, refs = _run(q, k, scale, bias, name)
            for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
                # dq, dk in their dtype; the fp32 loss, dscale and dbias at fp32_output_tol's row
                tol = dtype if what in ("dq", "dk") else fp32_output_tol(dtype, name, from_tiles=what == "dscale")
                assert_close(o, r, tol, f"{name} {what}, case {case}: n={n} m={m} d={d} {dtype} mode={mode}",
                             elementwise=what in ("dq", "dk"))
