"""Pure-PyTorch reference ops: they materialise the N x M matrix.  Test oracle and fallback."""
import contextlib
import math
from typing import Optional, Tuple

import torch


# Whether each device type has autocast, asked once: torch.compile of torch 2.11 cannot trace
# torch.amp.is_autocast_available (a graph break, an error under fullgraph), but reads this dict.
_HAS_AUTOCAST = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta")}


def autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (nothing for device types without autocast,
    such as meta): fastcl's own matmuls stay in the compute dtype, as the fused kernels do."""
    has = _HAS_AUTOCAST.get(device.type)
    if has is None:
        has = _HAS_AUTOCAST[device.type] = torch.amp.is_autocast_available(device.type)
    if has:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype is computed and reported in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scalar_tensor(value, device: torch.device, dtype: torch.dtype, name: str = "scale") -> torch.Tensor:
    """A 0-d tensor of ``dtype`` on ``device`` from a Python number or a one-element tensor.  A
    number is written by a fill on the device: ``torch.tensor(value, device="cuda")`` copies from
    the host and waits for the device's queue, on every call.

    A finite value beyond ``dtype``'s range (a scale of 1e39, or 1 / temperature for a temperature
    of 1e-45, in float32) raises a ValueError naming ``name``: as infinity it would give NaN in the
    fused kernels.  Tensors are read for this on the CPU only (a GPU read would wait)."""
    check_fits(name, value, dtype)
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.full((), float(value), device=device, dtype=dtype)


def check_fits(name: str, value, dtype: torch.dtype) -> None:
    """ValueError naming ``name`` if the number or one-element tensor ``value`` is finite but
    beyond ``dtype``'s range (it would become infinity there).  Tensors are read on the CPU only,
    and only when wider than ``dtype``; nothing is read while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.dtype.itemsize <= dtype.itemsize or not value.is_floating_point():
            return
        value = value.detach().reshape(())
    value = float(value)
    if math.isfinite(value) and abs(value) > torch.finfo(dtype).max:
        where = " (the temperature losses pass scale = 1 / temperature)" if name == "scale" else ""
        raise ValueError(f"{name} = {value:g} is outside the {dtype} range the loss computes in{where}")


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale, bias=None,
                     exclude_diagonal: Optional[int] = None) -> torch.Tensor:
    """(N, M) logits ``scale * q @ k.T + bias`` in the compute dtype, -inf where j == i + offset."""
    ct = compute_dtype(q.dtype)
    with autocast_off(q.device):  # the logits stay in the compute dtype
        s = (q.to(ct) @ k.to(ct).T) * (scale.to(ct) if isinstance(scale, torch.Tensor) else scale)
    if bias is not None:
        s = s + (bias.to(ct) if isinstance(bias, torch.Tensor) else bias)
    if exclude_diagonal is not None:
        n, m = s.shape
        rows = torch.arange(n, device=s.device)[:, None]
        cols = torch.arange(m, device=s.device)[None, :]
        s = s.masked_fill(cols == rows + exclude_diagonal, float("-inf"))
    return s


def reference_similarity_lse(q, k, scale, bias=None, *, rows=True, cols=False,
                             exclude_diagonal=None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Row (N,) and column (M,) log-sum-exp of the materialised logits ``scale * q @ k.T + bias``
    (entries with ``j == i + exclude_diagonal`` left out); None where not asked.

    q: (N, D) and k: (M, D), float32, bfloat16, float16 or float64, one dtype and device; scale,
    bias: float or 0-d tensor.  Returns float32 tensors (float64 for float64 inputs)."""
    s = reference_logits(q, k, scale, bias, exclude_diagonal)
    return (torch.logsumexp(s, 1) if rows else None, torch.logsumexp(s, 0) if cols else None)


def row_dots(a: torch.Tensor, b: torch.Tensor, index: Optional[torch.Tensor] = None,
             block_bytes: int = 16 * 2**20) -> torch.Tensor:
    """(N,) ``a_i . b_{index_i}`` for a (N, D), b (M, D) and index (N,) int64 (None: the first N rows
    of b, M >= N), in the compute dtype.  Half inputs on a GPU take one batched product with fp32
    accumulation and output; otherwise a block of rows at a time (about ``block_bytes`` of fp32
    copies), so half inputs never get whole (N, D) upcast or gathered copies."""
    with autocast_off(a.device):  # in the compute dtype under autocast too
        return _row_dots(a, b, index, block_bytes)


def _row_dots(a, b, index, block_bytes):
    ct = compute_dtype(a.dtype)
    n = a.shape[0]
    if index is None and a.is_cuda and a.dtype != ct:
        try:
            return torch.bmm(a.unsqueeze(1), b[:n].unsqueeze(2), out_dtype=ct).reshape(n)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # no fp32-output overload in this torch: the blocks below
    out = torch.empty(n, device=a.device, dtype=ct)
    rows = max(256, block_bytes // (8 * max(1, a.shape[1])))
    for i in range(0, n, rows):
        j = min(i + rows, n)
        y = b[i:j] if index is None else b.index_select(0, index[i:j])
        torch.bmm(a[i:j].to(ct).unsqueeze(1), y.to(ct).unsqueeze(2), out=out[i:j].view(-1, 1, 1))
    return out


def index_sum_(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += src[i]`` for every i, in place, summed in the same order on every run.

    out (R, D) and src (n, D) of one float dtype on one device; index (n,) int64 in [0, R).
    Returns ``out``; differentiable in ``src`` as ``index_add_`` is.  On CUDA ``index_add_`` adds
    with atomics, whose order varies from run to run; ``index_put_(accumulate=True)`` sorts the
    indices and sums each run of one index in order.  It sums a run serially, so callers keep
    the runs short (SupCon's class sums, runs of a whole class, stay on ``index_add_``).
    ``index_add_`` on the CPU is already ordered.  The order is fixed in eager mode: under
    ``torch.compile`` Inductor turns both into atomic adds unless deterministic algorithms are on.
    """
    if out.is_cuda:
        return out.index_put_((index,), src, accumulate=True)
    return out.index_add_(0, index, src)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]``: (n, ...) rows of x (R, ...) for index (n,) int64 in [0, R), differentiable,
    with a backward that sums repeated indices in the same order on every run in eager mode (see
    ``index_sum_``: on CUDA the backward of advanced indexing sorts, that of ``index_select`` adds
    with atomics).  For indices that repeat a few times (labels, positives): a run as long as a
    class is summed serially."""
    return x[index] if x.is_cuda else x.index_select(0, index)


def positive_logits(q: torch.Tensor, k: torch.Tensor, index: Optional[torch.Tensor], scale,
                    bias=None) -> torch.Tensor:
    """(N,) ``scale * q_i . k_{index_i} + bias`` in the compute dtype, differentiable: the reference
    path of ``similarity_lse(..., positives=...)`` and the ring losses' positive logits.

    ``index`` is an (N,) int64 tensor, or None for the diagonal (k_i), which needs no gather.
    """
    ct = compute_dtype(q.dtype)
    kk = k[: q.shape[0]] if index is None else take_rows(k, index)
    if q.dtype == ct:  # a batched row dot: no (N, D) product temporary
        with autocast_off(q.device):  # in the compute dtype under autocast too
            dots = torch.bmm(q.unsqueeze(1), kk.unsqueeze(2)).reshape(-1)
    else:
        dots = (q.to(ct) * kk.to(ct)).sum(-1)
    out = dots * (scale.to(ct) if isinstance(scale, torch.Tensor) else scale)
    if bias is None:
        return out
    return out + (bias.to(ct) if isinstance(bias, torch.Tensor) else bias)


def apply_function(function, *args):
    """``function.apply(*args)`` (a ``torch.autograd.Function``) with every tensor that is
    passed again after its first place replaced by a fresh alias (``t.view_as(t)``).  Eager
    autograd sums the gradients of a tensor passed twice (q as k), but torch.compile of torch
    2.11 kept only one of them (pytorch/pytorch#181146), a silently wrong gradient; later
    versions fall back to eager there, a graph break.  An alias is a distinct input to both."""
    fresh = []
    for a in args:  # `is`, not id(): torch 2.11's compile cannot trace id() of a tensor
        if isinstance(a, torch.Tensor) and any(a is b for b in fresh):
            a = a.view_as(a)
        fresh.append(a)
    return function.apply(*fresh)


def graph_grads(outputs, grad_outputs, inputs, needs_input_grad, n_grads: int) -> tuple:
    """An autograd backward's return value computed with ``create_graph=True``: the
    vector-Jacobian products of ``outputs`` (built from ``inputs`` by differentiable ops) with
    ``grad_outputs``; ``n_grads`` entries, None for the inputs not needing a gradient.  Fused ops
    use this for higher-order gradients, which their kernels do not provide.  ``inputs`` must be
    fresh aliases (``t.view_as(t)``) of the saved tensors, so that q and k passed as one tensor
    get their own gradients."""
    grads = [None] * n_grads
    wanted = [i for i in range(len(inputs)) if needs_input_grad[i]]
    if wanted and outputs:
        found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs=grad_outputs,
                                    create_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)


def softmax_mass(g: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """0-d ``sum_i g_i * sum_j P_ij`` for log-sum-exps ``lse`` (n,) of softmax rows P: the bias
    gradient of an LSE.  A row's P sums to 1 when its LSE is finite and to 0 when it is -inf (every
    entry excluded); NaN (or +inf) in the LSE gives NaN, as the materialised softmax does."""
    mass = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse - lse + 1)  # NaN where lse is NaN/+inf
    return (g * mass).sum()

