"""Strip driver of the ``cuda`` backend (``similarity_lse`` and ``sigmoid_pair_loss``).

For each strip of rows, cuBLAS (``torch.mm``) writes the raw scores ``x = q[strip] @ k.T`` in
fp32 into a workspace of at most ``workspace_bytes()``; one fused CUDA epilogue then reads the
strip once (csrc/cuda/similarity_strips.cu):

    forward   row LSE of s = scale * x + bias, the strip's column LSE (merged across strips with
              logaddexp, in strip order), or the sigmoid loss per row;
    backward  per block of rows x columns, the gradient tile dS (or G), written in place over
              the scores in the input dtype; fastcl/ops/strip_grads.py folds the tiles into dq
              and dk with cuBLAS (fp32 accumulation) under the same workspace bound.

The scores stay fp32 so the LSEs keep fp32 accuracy for half inputs (a bf16 score strip would
carry an absolute error of |s| * 2^-9).  Scale and bias are device scalars read by the epilogues,
so nothing syncs with the host.  The epilogues sit behind a small interface (``CudaEpilogues``);
the tests run this driver on the CPU with a pure-PyTorch stand-in (tests/_strip_emulation.py) and
with the CUDA epilogues themselves compiled for the CPU (tests/_cuda_host.py).

Epilogue interface (scores: (R, M) fp32 strip, row stride >= M; scale, bias: 0-d fp32; ``diag``:
local column offset of the special entry ``j == i + diag`` of row i, or None):

    lse_fwd(scores, scale, bias, diag, rows, cols) -> (row (R,) or (0,), col (M,) or (0,))  fp32
    lse_bwd(scores, scale, bias, diag, row_lse, g_row, col_lse, g_col, out_dtype) -> None
        writes dS over ``scores`` (see ``inplace_view``); row_lse/g_row (R,), col_lse/g_col (M,) or None
    sigmoid_fwd(scores, scale, bias, diag) -> (R,) fp32 row sums of the loss terms
    sigmoid_bwd(scores, scale, bias, diag, out_dtype) -> (R,) fp32 row sums of G; writes G in place
"""
import functools
import warnings
from typing import Optional, Tuple

import torch

from fastcl.ops.dispatch import env_setting
from fastcl.ops.intmath import cdiv

Tensor = torch.Tensor

# Scratch bound of the GPU backends: the cuda forward's score strips and both backends' backward
# (fastcl/ops/strip_grads.py).  64 MB is 0.8% of the 8 GB the naive CLIP loss took at N=32768,
# D=768, bf16 on an H100 (benchmarks/results/h100_20261127_f6a3808_clip_bench.json).
DEFAULT_WORKSPACE_MB = 64.0
# Set to a number of MB to override FASTCL_WORKSPACE_MB (and the default) in this process.
WORKSPACE_MB: Optional[float] = None
# Mirrors kFwdRowsPerBlock and kFwdSplitCols in csrc/cuda/similarity_strips.cuh (checked by a
# test): the forward epilogue keeps one column partial per PARTIAL_ROWS rows and one row
# partial per split of SPLIT_COLS columns, which count against the workspace too.
PARTIAL_ROWS = 16
SPLIT_COLS = 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Backward tiles (fastcl/ops/strip_grads.py): at least this many rows per strip, so the
# dS @ k_chunk product has enough output tiles, and column chunks in multiples of this
# (both by design, not timed yet).
GRAD_MIN_ROWS = 2048
GRAD_COL_ALIGN = 128


def workspace_mb() -> float:
    """The workspace bound in MB: ``WORKSPACE_MB``, else ``FASTCL_WORKSPACE_MB``, else 64."""
    if env_setting("FASTCL_CUDA_WORKSPACE_MB") is not None:  # the old name: refuse rather than ignore it
        raise ValueError("FASTCL_CUDA_WORKSPACE_MB was renamed FASTCL_WORKSPACE_MB (it now bounds the triton "
                         "backend's scratch too); set that instead")
    if WORKSPACE_MB is not None:
        value, where = WORKSPACE_MB, "fastcl.ops.strips.WORKSPACE_MB"
    else:
        where = "FASTCL_WORKSPACE_MB"
        text = env_setting(where)
        if text is None:
            return DEFAULT_WORKSPACE_MB
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{where} must be a number of MB, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{where} must be > 0 MB, got {value!r}")
    return float(value)


def workspace_bytes() -> int:
    """The workspace bound in bytes (see ``workspace_mb``)."""
    return int(workspace_mb() * 2**20)


def row_blocks(n: int, m: int, bytes_per_entry: int = 4):
    """Row ranges [r0, r1) of an (n, m) matrix whose (rows, m) blocks, at ``bytes_per_entry``
    bytes of scratch per entry, fit the workspace bound (at least one row each)."""
    rows = max(1, workspace_bytes() // (bytes_per_entry * max(m, 1)))
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


def workspace_usage(rows: int, m: int) -> int:
    """Bytes the driver and the epilogues hold at once for a strip of ``rows`` x ``m``: the fp32
    score strip, the forward's column partials (rows / PARTIAL_ROWS) x m and row partials."""
    col_parts = cdiv(rows, PARTIAL_ROWS) * m if rows > PARTIAL_ROWS else 0
    row_parts = rows * cdiv(m, SPLIT_COLS) if m > SPLIT_COLS else 0
    return 4 * (rows * m + col_parts + row_parts)


def strip_rows(n: int, m: int, budget: Optional[int] = None) -> int:
    """Rows per strip: as many as fit ``budget`` bytes (default ``workspace_bytes()``), at most n.

    A multiple of PARTIAL_ROWS when more than that many fit (whole row groups); at least one
    row even if a single row exceeds the budget (then one row of m fp32 scores is used).
    """
    budget = workspace_bytes() if budget is None else budget
    lo, hi = 1, max(1, min(n, budget // (4 * m)))  # usage >= 4 * rows * m
    while lo < hi:  # the most rows whose usage fits (usage grows with rows)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if workspace_usage(mid, m) <= budget else (lo, mid - 1)
    if lo > PARTIAL_ROWS and lo < n:
        lo -= lo % PARTIAL_ROWS
    return lo


def mm_f32_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with fp32 accumulation and an fp32 ``out``.

    a (P, K), b (K, Q): one dtype (float32/bfloat16/float16/float64, any strides); out (P, Q)
    float32 (float64 for float64 inputs).  Half inputs stay on the tensor cores and cuBLAS writes
    or adds into ``out`` itself (beta = 1), so no temporary of out's size is made.  Where that
    overload is missing: on a GPU, the product goes through an fp32 temporary of out's size (still
    on the tensor cores, with a warning); on the CPU (tests), through fp32 copies of a and b.
    """
    if a.dtype in (torch.float32, torch.float64):
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    try:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return
    except (TypeError, RuntimeError, NotImplementedError):  # no dtype overloads (CPU, older torch)
        pass
    if a.is_cuda:
        _warn_slow_mm(a.dtype)
        try:
            prod = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            prod = torch.mm(a, b).float()  # the product rounded to a's dtype once
        if accumulate:
            out += prod
        else:
            out.copy_(prod)
        return
    if accumulate:
        out.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=out)


@functools.lru_cache(maxsize=None)
def _warn_slow_mm(dtype: torch.dtype) -> None:
    # On a GPU the fallback costs a temporary of the output's size and an extra pass over it.
    warnings.warn(f"fastcl: torch.addmm/mm with out_dtype=float32 into an fp32 out= is missing for {dtype} here "
                  f"(torch {torch.__version__}); the strip matmuls go through an fp32 temporary, which is "
                  "slower and uses more memory", RuntimeWarning, stacklevel=3)


def inplace_view(scores: Tensor, dtype: torch.dtype) -> Tensor:
    """The (R, M) tile in ``dtype`` that a backward epilogue writes over the fp32 strip (R, M):
    row i lies in the first bytes of the strip's row i (row stride 4 / itemsize times longer)."""
    if dtype == torch.float32:
        return scores
    return scores.view(dtype)[:, :scores.shape[1]]


def _cuda_kernel(name: str):
    # The public functions pick "cuda" only when the build has it; the registered ops take any
    # backend name, so a build without the CUDA kernels gets this error there, not an AttributeError.
    try:
        return getattr(torch.ops.fastcl_C, name)
    except (AttributeError, RuntimeError) as exc:
        raise RuntimeError(f"backend='cuda' needs fastcl built with its CUDA kernels, and this build has no "
                           f"{name} (`fastcl info` shows them); use backend='triton' or 'reference'") from exc


class CudaEpilogues:
    """The fused epilogues of csrc/cuda/similarity_strips.cu (``torch.ops.fastcl_C.cuda_strip_*``).

    Signatures: see the module docstring."""

    @staticmethod
    def lse_fwd(scores, scale, bias, diag, rows, cols):
        return _cuda_kernel("cuda_strip_lse_fwd")(scores, scale, bias, diag, rows, cols)

    @staticmethod
    def lse_bwd(scores, scale, bias, diag, row_lse, g_row, col_lse, g_col, out_dtype):
        _cuda_kernel("cuda_strip_lse_bwd")(scores, scale, bias, diag, row_lse, g_row, col_lse, g_col, out_dtype)

    @staticmethod
    def sigmoid_fwd(scores, scale, bias, diag):
        return _cuda_kernel("cuda_strip_sigmoid_fwd")(scores, scale, bias, diag)

    @staticmethod
    def sigmoid_bwd(scores, scale, bias, diag, out_dtype):
        return _cuda_kernel("cuda_strip_sigmoid_bwd")(scores, scale, bias, diag, out_dtype)


# The epilogues the driver calls; tests swap in a pure-PyTorch stand-in to run it on the CPU.
EPILOGUES = CudaEpilogues


def _scalars(q: Tensor, scale: Tensor, bias: Tensor):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the cuda backend supports float32, bfloat16 and float16 inputs, got {q.dtype}; "
                        "use backend='reference' (or 'cpu' for CPU tensors) for float64")
    f32 = lambda t: t.to(device=q.device, dtype=torch.float32).reshape(()).contiguous()  # noqa: E731
    return f32(scale), f32(bias)


def _prepare(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor):
    scale, bias = _scalars(q, scale, bias)
    ws = torch.empty((strip_rows(q.shape[0], k.shape[0]), k.shape[0]), device=q.device, dtype=torch.float32)
    return scale, bias, ws


def _strips(n: int, ws: Tensor):
    step = ws.shape[0]
    for r0 in range(0, n, step):
        yield r0, min(step, n - r0)


def lse_forward(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, rows: bool, cols: bool,
                diag_offset: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Row LSE (N,) and column LSE (M,) of ``scale * q @ k.T + bias`` (each (0,) when not
    asked), float32; entries ``j == i + diag_offset`` left out.

    q (N, D), k (M, D): float32/bfloat16/float16 on one CUDA device; scale, bias: 0-d tensors.
    """
    epi = EPILOGUES
    scale, bias, ws = _prepare(q, k, scale, bias)
    n, m = q.shape[0], k.shape[0]
    row = torch.empty(n if rows else 0, device=q.device, dtype=torch.float32)
    col = torch.full((m if cols else 0,), float("-inf"), device=q.device, dtype=torch.float32)
    kt = k.T
    for r0, nr in _strips(n, ws):
        scores = ws[:nr]
        mm_f32_into(scores, q[r0:r0 + nr], kt, accumulate=False)
        diag = None if diag_offset is None else r0 + int(diag_offset)
        r, c = epi.lse_fwd(scores, scale, bias, diag, rows, cols)
        if rows:
            row[r0:r0 + nr] = r
        if cols:  # strip order: deterministic
            torch.logaddexp(col, c, out=col)
    return row, col


def _grads(q: Tensor, k: Tensor, grad_scale: Tensor, epilogue, out_dtype: torch.dtype,
           g_pos: Optional[Tensor] = None, pos_index: Optional[Tensor] = None, need_dq: bool = True,
           need_dk: bool = True):
    """``strip_grads`` with cuBLAS fp32 score tiles and an in-place epilogue
    ``epilogue(scores, r0, c0)`` that overwrites the (nr, nc) fp32 scores with the gradient tile."""
    from fastcl.ops.strip_grads import strip_grads

    def form_tile(ws, r0, nr, c0, nc):
        scores = ws[:nr * nc].view(nr, nc)
        mm_f32_into(scores, q[r0:r0 + nr], k[c0:c0 + nc].T, accumulate=False)
        epilogue(scores, r0, c0)
        return inplace_view(scores, q.dtype)

    return strip_grads(q, k, grad_scale.to(torch.float32), form_tile, tile_dtype=torch.float32,
                       out_dtype=out_dtype, g_pos=g_pos, pos_index=pos_index, min_rows=GRAD_MIN_ROWS, row_align=PARTIAL_ROWS,
                       col_align=GRAD_COL_ALIGN, need_dq=need_dq, need_dk=need_dk)


def lse_grads(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, row_lse: Tensor, col_lse: Tensor,
              g_row: Tensor, g_col: Tensor, g_pos: Optional[Tensor], pos_index: Optional[Tensor],
              diag_offset: Optional[int], grad_scale: Tensor, out_dtype: torch.dtype, need_dq: bool = True,
              need_dk: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, qgq)`` of ``fastcl::similarity_lse_bwd`` (see there) for
    ``dS = g_row * P_row + g_col * P_col``: dq (N, D), dk (M, D) in out_dtype, qgq 0-d fp32.

    q (N, D), k (M, D) as in ``lse_forward``; row_lse, g_row (N,) and col_lse, g_col (M,) fp32,
    where an empty row_lse / col_lse (0,) marks a side the forward did not compute; g_pos (N,)
    fp32 or None, pos_index (N,) int64 or None; grad_scale 0-d.  ``need_dq`` / ``need_dk`` False
    skip that side (it comes back (0, D)).
    """
    epi = EPILOGUES
    scale, bias = _scalars(q, scale, bias)
    rows, cols = row_lse.numel() > 0, col_lse.numel() > 0
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    row_lse, g_row, col_lse, g_col = f32(row_lse), f32(g_row), f32(col_lse), f32(g_col)

    def epilogue(scores, r0, c0):
        nr, nc = scores.shape
        diag = None if diag_offset is None else r0 + int(diag_offset) - c0
        epi.lse_bwd(scores, scale, bias, diag,
                    row_lse[r0:r0 + nr] if rows else None, g_row[r0:r0 + nr] if rows else None,
                    col_lse[c0:c0 + nc] if cols else None, g_col[c0:c0 + nc] if cols else None, q.dtype)

    return _grads(q, k, grad_scale, epilogue, out_dtype, None if g_pos is None else f32(g_pos), pos_index,
                  need_dq, need_dk)


def sigmoid_forward(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``sum_ij softplus(-z_ij * (scale * q_i . k_j + bias))``, z = +1 iff j == i: 0-d float32.

    q (N, D), k (M, D): float32/bfloat16/float16 on one CUDA device; scale, bias: 0-d tensors.
    Row sums are added in float64, strip by strip (deterministic).
    """
    epi = EPILOGUES
    scale, bias, ws = _prepare(q, k, scale, bias)
    total = torch.zeros((), device=q.device, dtype=torch.float64)
    kt = k.T
    for r0, nr in _strips(q.shape[0], ws):
        scores = ws[:nr]
        mm_f32_into(scores, q[r0:r0 + nr], kt, accumulate=False)
        total += epi.sigmoid_fwd(scores, scale, bias, r0).sum(dtype=torch.float64)
    return total.to(torch.float32)


def sigmoid_grads(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, grad_scale: Tensor,
                  out_dtype: torch.dtype, need_dq: bool = True,
                  need_dk: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, qgq, gsum)`` with ``G = dL/ds`` of ``sigmoid_forward``'s loss: dq = grad_scale *
    G @ k (N, D), dk = grad_scale * G.T @ q (M, D) in out_dtype, qgq = sum(q * (G @ k)) and
    gsum = sum(G), 0-d fp32 (row sums added in fp64).  Inputs as in ``sigmoid_forward``."""
    epi = EPILOGUES
    scale, bias = _scalars(q, scale, bias)
    gsum = torch.zeros((), device=q.device, dtype=torch.float64)

    def epilogue(scores, r0, c0):
        nonlocal gsum
        gsum += epi.sigmoid_bwd(scores, scale, bias, r0 - c0, q.dtype).sum(dtype=torch.float64)

    dq, dk, qgq = _grads(q, k, grad_scale, epilogue, out_dtype, need_dq=need_dq, need_dk=need_dk)
    return dq, dk, qgq, gsum.to(torch.float32)
