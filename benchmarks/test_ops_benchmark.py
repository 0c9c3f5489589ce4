"""pytest-benchmark timings of every fused op against its naive PyTorch baseline.

    pytest benchmarks/test_ops_benchmark.py --benchmark-group-by=param:case,param:n

The cases (inputs, naive baselines in ``fastcl.baselines``, fused calls) are the ones
``fastcl bench`` sweeps, taken from ``fastcl.profiling.CASES``: one copy of each baseline.
"""
import pytest
import torch

from fastcl.profiling import CASES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("n", [256, 1024] if DEVICE == "cpu" else [4096, 16384])
@pytest.mark.parametrize("method", ["naive", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_fwd_bwd(benchmark, case, method, n):
    try:
        make, methods = CASES[case]()
    except Exception as exc:  # the op is not written or not built yet
        pytest.skip(f"{case}: {exc}")
    fn = methods[method]
    inputs = make(n, 128, torch.device(DEVICE), DTYPE, torch.Generator().manual_seed(0))

    def step():
        for x in inputs:
            x.grad = None
        fn(inputs, None).float().sum().backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case} n={n}"
    benchmark(step)
