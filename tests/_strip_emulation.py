"""A pure-PyTorch stand-in for the CUDA strip epilogues (interface in fastcl/ops/strips.py).

It computes what each epilogue must produce, from the definitions, in float64, so the strip
driver can run on the CPU, and the GPU tests can check each CUDA epilogue against it.
``route_cuda_backend`` points ``backend="cuda"`` on CPU tensors at the driver with given epilogues."""
import importlib

import torch

from fastcl.ops import strips
from fastcl.ops.dispatch import resolve_backend
from fastcl.ops.strips import inplace_view

# The modules whose ops resolve a backend name (fastcl.ops re-exports functions under the names
# of the similarity_lse and sigmoid_pair modules, so they are patched by module object).
CUDA_OP_MODULES = ("fastcl.ops.similarity_lse", "fastcl.ops.sigmoid_pair")


def route_cuda_backend(monkeypatch, epilogues, modules=CUDA_OP_MODULES) -> None:
    """``backend="cuda"`` on CPU tensors resolves as on a GPU in ``modules``, and the strip driver
    (fastcl/ops/strips.py) calls ``epilogues`` (TorchEpilogues, or the compiled kernels)."""
    resolve = lambda backend, device, problem=None: (  # noqa: E731
        "cuda" if backend == "cuda" else resolve_backend(backend, device, problem))
    for module in modules:
        monkeypatch.setattr(importlib.import_module(module), "resolve_backend", resolve)
    monkeypatch.setattr(strips, "EPILOGUES", epilogues)


def _logits(scores, scale, bias, diag, fill):
    """(R, M) float64 logits of the strip and the mask of the special entries j == i + diag."""
    s = scores.double() * scale.double() + bias.double()
    r, m = s.shape
    special = torch.zeros_like(s, dtype=torch.bool)
    if diag is not None:
        i = torch.arange(r, device=s.device)
        j = i + diag
        ok = (j >= 0) & (j < m)
        special[i[ok], j[ok]] = True
    if fill is not None:
        s = s.masked_fill(special, fill)
    return s, special


class TorchEpilogues:
    """Same signatures as ``fastcl.ops.strips.CudaEpilogues``."""

    @staticmethod
    def lse_fwd(scores, scale, bias, diag, rows, cols):
        s, _ = _logits(scores, scale, bias, diag, float("-inf"))
        empty = scores.new_empty(0)
        return (torch.logsumexp(s, 1).float() if rows else empty,
                torch.logsumexp(s, 0).float() if cols else empty)

    @staticmethod
    def lse_bwd(scores, scale, bias, diag, row_lse, g_row, col_lse, g_col, out_dtype):
        s, special = _logits(scores, scale, bias, diag, None)
        ds = torch.zeros_like(s)
        # An LSE of -inf (every entry excluded) counts as +inf: its probabilities are 0.
        for lse, g, dim in ((row_lse, g_row, 1), (col_lse, g_col, 0)):
            if lse is None:
                continue
            lse = lse.double().masked_fill(lse == float("-inf"), float("inf"))
            lse, g = (lse[:, None], g.double()[:, None]) if dim == 1 else (lse[None, :], g.double()[None, :])
            ds = ds + g * torch.exp(s - lse)
        ds = ds.masked_fill(special, 0.0)
        inplace_view(scores, out_dtype).copy_(ds.to(out_dtype))

    @staticmethod
    def sigmoid_fwd(scores, scale, bias, diag):
        s, special = _logits(scores, scale, bias, diag, None)
        t = torch.where(special, -s, s)
        return (t.clamp_min(0) + torch.log1p(torch.exp(-t.abs()))).sum(1).float()

    @staticmethod
    def sigmoid_bwd(scores, scale, bias, diag, out_dtype):
        s, special = _logits(scores, scale, bias, diag, None)
        g = torch.where(special, -torch.sigmoid(-s), torch.sigmoid(s))
        inplace_view(scores, out_dtype).copy_(g.to(out_dtype))
        return g.sum(1).float()
