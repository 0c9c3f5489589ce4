"""The host-side grid helpers give Triton's answers (fastcl/ops/intmath.py replaces
triton.cdiv and triton.next_power_of_2 in launch code, where Triton 3.6's versions cost a JIT
unwrap per call)."""
import pytest

from fastcl.ops.intmath import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_same_as_triton():
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    for n in (2 ** 31 - 1, 2 ** 31, 2 ** 40 + 5):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        assert cdiv(n, 7) == triton.cdiv(n, 7)
