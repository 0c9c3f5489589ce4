"""Integer helpers for launch grids and plans, in plain Python.

Triton's ``cdiv`` and ``next_power_of_2`` are constexpr functions since Triton 3.6: called from
host code, each call unwraps its arguments through Triton's JIT machinery (about 3 us, the H200
host profile at 9f5ade0 booked 113 such calls to one CLIP step at N=32768).  These give the same
results for the non-negative ints the launchers pass.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for n = 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
