"""Collectives for contrastive losses across ranks: autograd-aware gather/reduce and a P2P ring.

Everything here takes an optional ``group`` (default: the default process group) and works on
gloo (CPU) and NCCL (CUDA).  Shapes and dtypes are checked *collectively* first: every rank
publishes a small metadata vector, so a rank with a different D or dtype makes every rank raise
the same error instead of leaving the others blocked in a collective.
"""
import math
import numbers
import struct
import sys
import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_TRAILING = 5           # trailing dims described in the metadata vector
_META_LEN = 4 + _MAX_TRAILING  # [error, ndim, dtype code, dim 0, trailing dims ...]
# The exchange's first all_gather has a fixed length, so ranks that called different operations
# (argument lists of different lengths) meet in a collective of one size and can all raise:
# [n tensors, n settings, crc of the caller, crc of the names, caller's name (32 bytes)], then the
# metadata, zero-padded.  Metadata past _WIRE_LEN (more than any fastcl loss sends) follows in a
# second all_gather, once every rank knows the lengths agree.
_NAME_WORDS = 4
_HEAD_LEN = 4 + _NAME_WORDS
_WIRE_LEN = 64


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialised and ``group`` spans more than one rank.

    Raises RuntimeError on a process outside ``group``: a loss built for a group this rank is not
    in would otherwise quietly compute a local loss."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size(group)
    if world < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return world > 1


def group_info(group=None) -> Tuple[int, int]:
    """(rank in ``group``, size of ``group``); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _uses(backend: str, group) -> bool:
    """Whether ``group`` runs on the torch.distributed backend named ``backend`` ("nccl", "gloo")."""
    return backend in str(dist.get_backend(group)).lower()


def _comm_device(x: Tensor, group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones through host copies).
    return x.device if _uses("nccl", group) else torch.device("cpu")


def _encode(x: Optional[Tensor], error: bool) -> List[int]:
    if x is None or error:
        return [1] + [0] * (_META_LEN - 1)
    trailing = list(x.shape[1:])
    too_many = len(trailing) > _MAX_TRAILING or x.dim() == 0
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    trailing = (trailing + [-1] * _MAX_TRAILING)[:_MAX_TRAILING]
    return [2 if too_many else 0, x.dim(), code, x.shape[0] if x.dim() else 0] + trailing


def _describe(row: Sequence[int]) -> str:
    if row[0] == 1:
        return "<failed its local argument checks>"
    if row[0] == 2:
        return f"<unsupported: {row[1]}-D>"
    dtype = _DTYPES[row[2]] if row[2] < len(_DTYPES) else "unsupported dtype"
    dims = [row[3]] + [d for d in row[4:4 + row[1] - 1]]
    return f"shape {tuple(dims)} {dtype}"


# Settings (see ``exchange_shapes``) travel as (kind, payload) int64 pairs.  Numbers of any type
# (bools, ints, floats, numpy scalars, one-element tensors) compare by value as float64, so that
# 1 and 1.0, True and 1, or a float and a tensor holding it agree.
_NONE, _NUMBER, _STR, _LONG_STR, _OTHER = range(5)
_NAN_BITS = struct.unpack("<q", struct.pack("<d", float("nan")))[0]


def _float_bits(v: float) -> int:
    if math.isnan(v):
        return _NAN_BITS  # one NaN, whatever its sign or payload
    return struct.unpack("<q", struct.pack("<d", v + 0.0))[0]  # + 0.0: -0.0 is 0.0


def _is_float_scalar(v) -> bool:
    return isinstance(v, Tensor) and v.numel() == 1 and v.is_floating_point()


def _encode_setting(value) -> Tuple[int, int]:
    """Host part of one setting; a float tensor's value is filled in on its device (``_setting_values``)."""
    if value is None:
        return _NONE, 0
    if _is_float_scalar(value):
        return _NUMBER, 0
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # a bool or int flag given as a tensor (a sync, for an odd input)
    if hasattr(value, "item") and not isinstance(value, Tensor):  # numpy scalars
        value = value.item()
    if isinstance(value, numbers.Real):
        return _NUMBER, _float_bits(float(value))
    if isinstance(value, str):
        raw = value.encode(errors="replace")
        if len(raw) <= 8:  # the text itself, so the error can show it
            return _STR, int.from_bytes(raw.ljust(8, b"\0"), "little", signed=True)
        return _LONG_STR, zlib.crc32(raw)
    return _OTHER, zlib.crc32(repr(value).encode(errors="replace"))


def _setting_values(settings, device: torch.device) -> Tensor:
    """(2 * len(settings),) int64 on ``device``: each setting's kind and payload, a float tensor's
    value as the bits of its float64 (written on the device: no wait for it here)."""
    host = torch.tensor([x for _, v in settings for x in _encode_setting(v)], dtype=torch.int64)
    out = host.to(device, non_blocking=True)
    for i, (_, v) in enumerate(settings):
        if _is_float_scalar(v):
            x = v.detach().reshape(()).to(device=device, dtype=torch.float64) + 0.0
            x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)
            out[2 * i + 1] = x.view(torch.int64)
    return out


_GRAPH_SETTING = "<inputs requiring grad>"


def _requires_grad_mask(named) -> int:
    """Bit i set when the i-th value of ``named`` ((name, value) pairs) is a tensor that autograd
    records here (grad mode on and it requires grad)."""
    if not torch.is_grad_enabled():
        return 0
    return sum(1 << i for i, (_, v) in enumerate(named) if isinstance(v, Tensor) and v.requires_grad)


def _graph_names(encoded: Tuple[int, int], names: Sequence[str]) -> str:
    mask = int(struct.unpack("<d", struct.pack("<q", encoded[1]))[0])
    chosen = [n for i, n in enumerate(names) if mask >> i & 1]
    return "[" + ", ".join(chosen) + "]"


def _decode_setting(kind: int, payload: int) -> str:
    if kind == _NUMBER:
        return repr(struct.unpack("<d", struct.pack("<q", payload))[0])
    if kind == _STR:
        return repr(payload.to_bytes(8, "little", signed=True).rstrip(b"\0").decode(errors="replace"))
    return "None" if kind == _NONE else "<a different value>"


def _caller_name() -> str:
    """Name of the operation that called ``exchange_shapes``: the innermost public function up the
    stack (``clip_loss_distributed``, not its private helper), its class named for a method."""
    f, first = sys._getframe(2), None
    for _ in range(8):
        if f is None:
            break
        code = f.f_code
        name = getattr(code, "co_qualname", code.co_name).replace("<locals>.", "")  # co_qualname: 3.11+
        first = first or name
        if not code.co_name.startswith(("_", "<")):  # private helpers, lambdas, comprehensions
            return name
        f = f.f_back
    return first or "?"


def _name_words(name: str) -> List[int]:
    """``name``'s last 8 * _NAME_WORDS bytes (the specific end of a qualified name) as int64s."""
    raw = name.encode(errors="replace")[-8 * _NAME_WORDS:].ljust(8 * _NAME_WORDS, b"\0")
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little", signed=True) for i in range(_NAME_WORDS)]


def _describe_call(head: Sequence[int]) -> str:
    raw = b"".join(w.to_bytes(8, "little", signed=True) for w in head[4:_HEAD_LEN]).rstrip(b"\0")
    return f"{raw.decode(errors='replace')} ({head[0]} tensor(s), {head[1]} setting(s))"


def _check_heads(heads: List[List[int]], local_error: Optional[BaseException]) -> None:
    """Raise on every rank when the ranks' headers differ (before any exchange sized by them)."""
    if all(h == heads[0] for h in heads):
        return
    got = ", ".join(f"rank {r}: {_describe_call(h)}" for r, h in enumerate(heads))
    if any(h[2] != heads[0][2] for h in heads):
        msg = ("the ranks of the group called different distributed operations (every rank must call the "
               f"same one); got {got}")
    else:
        msg = ("the ranks of the group passed different argument lists (the same tensors and settings, by name, "
               f"on every rank); got {got}")
    raise RuntimeError(msg) from local_error


def exchange_shapes(tensors: Sequence[Tuple[str, Optional[Tensor]]], group=None,
                    local_error: Optional[BaseException] = None, settings: Sequence[Tuple[str, object]] = (),
                    like: Optional[Tensor] = None, grad_inputs: Sequence[Tuple[str, object]] = ()) -> List[List[int]]:
    """Check that every rank holds tensors of the same trailing shape and dtype, and the same
    settings; return dim-0 sizes.

    Args:
        tensors: (name, tensor) pairs, the same names in the same order on every rank; each tensor
            is at least 1-D and may differ between ranks only in its dim-0 size.
        group: process group (default: the world).
        local_error: an exception from this rank's own argument checks, or None.  It is published
            to the other ranks (so they raise too) and then re-raised here.
        settings: (name, value) pairs that must be equal on every rank, the same names in the same
            order everywhere: None, bools, ints, floats, strings, or one-element float tensors
            (compared by value as float64, with a float; read where the exchange already waits).
        like: a tensor whose device the exchange uses when ``tensors`` holds none.
        grad_inputs: more (name, tensor) pairs that must require grad alike on every rank (as
            ``tensors`` and tensor ``settings`` must: their backward runs collectives).

    Returns:
        ``sizes[i][r]``: dim-0 size of tensor ``i`` on rank ``r`` of ``group``.

    Raises:
        RuntimeError on every rank if the ranks called it from different operations (the innermost
        public function up the stack, e.g. ``clip_loss_distributed`` on one rank and
        ``ntxent_loss_distributed`` on another) or with different lists of tensor and setting
        names, if any rank reported an error, or the ranks disagree on the number of dims, any
        trailing dim, the dtype or a setting, or any rank has an empty tensor, or the ranks differ
        in which tensors (of ``tensors``, ``settings`` and ``grad_inputs``) require grad.
    """
    rank, world = group_info(group)
    if world == 1:
        gathered = [[_encode(t, local_error is not None) for _, t in tensors]]
        set_rows = [[]]
    else:
        # NCCL moves CUDA tensors only: a rank whose inputs are not tensors (its checks failed)
        # must still publish on the device the other ranks use.
        nccl = _uses("nccl", group)
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        for _, t in list(tensors) + [("like", like)]:
            if isinstance(t, Tensor) and (t.is_cuda or not nccl):
                device = _comm_device(t, group)
                break
        # Which tensors take part in autograd travels as one more setting: their backward runs
        # collectives, so ranks that differ there would wait for each other in the backward.
        graph = _requires_grad_mask(list(tensors) + list(settings) + list(grad_inputs))
        checked = list(settings) + [(_GRAPH_SETTING, graph)]
        set_vals = torch.zeros(2 * len(checked), dtype=torch.int64, device=device)
        try:  # a setting that cannot be encoded is this rank's error, published like the others
            set_vals = _setting_values(checked, device)
        except Exception as e:
            local_error = local_error or e
        rows = [_encode(t, local_error is not None) for _, t in tensors] or [[1 if local_error else 0]]
        n_meta = sum(len(r) for r in rows)
        caller = _caller_name()
        names = "\0".join([n for n, _ in tensors] + ["|"] + [n for n, _ in settings]).encode(errors="replace")
        head = [len(tensors), len(settings), zlib.crc32(caller.encode(errors="replace")), zlib.crc32(names)]
        host = torch.tensor(head + _name_words(caller) + [x for r in rows for x in r], dtype=torch.int64)
        wire = torch.cat([host.to(device, non_blocking=True), set_vals])
        if wire.numel() < _WIRE_LEN:
            wire = torch.cat([wire, wire.new_zeros(_WIRE_LEN - wire.numel())])
        out = [torch.empty_like(wire[:_WIRE_LEN]) for _ in range(world)]
        dist.all_gather(out, wire[:_WIRE_LEN], group=group)
        flat = [o.tolist() for o in out]
        _check_heads([f[:_HEAD_LEN] for f in flat], local_error)
        total = _HEAD_LEN + n_meta + set_vals.numel()  # the same on every rank now
        if total > _WIRE_LEN:
            tail = [torch.empty_like(wire[_WIRE_LEN:]) for _ in range(world)]
            dist.all_gather(tail, wire[_WIRE_LEN:], group=group)
            flat = [f + t.tolist() for f, t in zip(flat, tail)]
        flat = [f[_HEAD_LEN:total] for f in flat]
        gathered = [[f[i * _META_LEN:(i + 1) * _META_LEN] for i in range(len(tensors))] or [f[:1]] for f in flat]
        set_rows = [f[n_meta:] for f in flat]
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if any(row[0] == 1 for row in gathered[r])]
    if failed:
        raise RuntimeError(f"distributed loss: the argument checks failed on rank(s) {failed} of the group; "
                           "see the error raised on those ranks")
    for i, (name, _) in enumerate(list(settings) + [(_GRAPH_SETTING, None)] if world > 1 else ()):
        per_rank = [tuple(r[2 * i:2 * i + 2]) for r in set_rows]
        if any(v != per_rank[0] for v in per_rank):
            if name == _GRAPH_SETTING:
                names = [n for n, _ in list(tensors) + list(settings) + list(grad_inputs)]
                raise RuntimeError(
                    "the same inputs must require grad on every rank of the group (the backward runs "
                    "collectives on the ranks whose inputs do); got " + ", ".join(
                        f"rank {r}: {_graph_names(v, names)}" for r, v in enumerate(per_rank)))
            raise RuntimeError(f"{name} must be the same on every rank of the group; got "
                               + ", ".join(f"rank {r}: {_decode_setting(*v)}" for r, v in enumerate(per_rank)))
    sizes = []
    for i, (name, _) in enumerate(tensors):
        per_rank = [gathered[r][i] for r in range(world)]
        if any(row[0] == 2 for row in per_rank):
            raise RuntimeError(f"{name}: only 1-D to {_MAX_TRAILING + 1}-D tensors can be exchanged; got "
                               + ", ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(per_rank)))
        if any(row[1:3] + row[4:] != per_rank[0][1:3] + per_rank[0][4:] for row in per_rank):
            raise RuntimeError(f"{name} must have the same trailing shape and dtype on every rank "
                               "(only dim 0 may differ); got "
                               + ", ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(per_rank)))
        if any(row[3] == 0 for row in per_rank):
            raise RuntimeError(f"{name} must be non-empty on every rank; got "
                               + ", ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(per_rank)))
        sizes.append([row[3] for row in per_rank])
    return sizes


def _tensor_error(x) -> Optional[TypeError]:
    """The error for a non-tensor ``x`` (published by the caller's exchange), or None."""
    return None if isinstance(x, Tensor) else TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")


def _check_tensor(x) -> None:
    err = _tensor_error(x)
    if err is not None:
        raise err


def _gather_padded(x: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Concatenation over ranks of ``x`` (dim-0 sizes ``sizes``), padded to one size for the wire."""
    dev = _comm_device(x, group)
    cap = max(sizes)
    buf = x.detach().to(dev).contiguous()
    if buf.shape[0] < cap:
        buf = torch.cat([buf, buf.new_zeros((cap - buf.shape[0],) + tuple(buf.shape[1:]))])
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(x.device)


def _reduce_scatter_sum(g: Tensor, sizes: Sequence[int], rank: int, group) -> Tensor:
    """This rank's slice of the sum over ranks of ``g`` (dim 0 = sum(sizes))."""
    # A contiguous copy first: non-contiguous gradient buffers gave wrong results in some
    # all_gather backwards (pytorch#120386).
    dev = _comm_device(g, group)
    g = g.to(dev).contiguous()
    start = sum(sizes[:rank])
    if _uses("nccl", group):
        cap = max(sizes)
        chunks = []
        for r, n in enumerate(sizes):
            c = g[sum(sizes[:r]):sum(sizes[:r]) + n]
            if n < cap:
                c = torch.cat([c, c.new_zeros((cap - n,) + tuple(c.shape[1:]))])
            chunks.append(c)
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter_tensor(out, torch.cat(chunks), group=group)
        return out[:sizes[rank]]
    # gloo has no reduce-scatter; the all-reduce moves W times more data but is exact.
    dist.all_reduce(g, group=group)
    return g[start:start + sizes[rank]].clone()


def refuse_graph_backward(what: str, world: int = 2) -> None:
    """Raise when a backward runs with create_graph=True: the collectives that form these
    gradients are not differentiable ops, so a second derivative would miss the other ranks'
    terms (or fail later naming an internal op).  ``world``: the group's size (the ring's blocks
    are not differentiable on one process either)."""
    if torch.is_grad_enabled():
        if world > 1:
            raise RuntimeError(f"{what} have no second derivative across ranks, so they do not support backward "
                               "with create_graph=True (on one process the losses do)")
        raise RuntimeError(f"{what} have no second derivative, so they do not support backward with "
                           "create_graph=True; on one process dist_impl='gather' (or the plain loss) does")


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        ctx.device = x.device
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        refuse_graph_backward("the gradient-carrying all-gather (dist_impl='gather')")
        # Each rank's copy of the owner's rows received its own gradient: sum them (no 1/W).
        return _reduce_scatter_sum(g, ctx.sizes, ctx.rank, ctx.group).to(ctx.device), None, None


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.detach().to(_comm_device(x, group)).contiguous().clone()
        dist.all_reduce(y, group=group)
        return y.to(x.device)

    @staticmethod
    def backward(ctx, g):
        refuse_graph_backward("the gradient-carrying all-reduce")
        # y = sum_r x_r is read by every rank, so d(sum_r L_r)/dx_r = sum_r dL_r/dy.
        return _sum_over_ranks(g, ctx.group), None


def _sum_over_ranks(g: Tensor, group) -> Tensor:
    """``g`` summed over the ranks of ``group`` (a copy on ``g``'s device; ``g`` is left alone)."""
    gy = g.to(_comm_device(g, group)).contiguous().clone()
    dist.all_reduce(gy, group=group)
    return gy.to(g.device)


class _ReplicatedMeanGrad(torch.autograd.Function):
    """Identity on a value that every rank holds alike; its gradient is the mean over ranks of
    the ranks' gradients (one all-reduce), so every rank reads the same value."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        refuse_graph_backward("the replicated value's gradient all-reduce")
        return _sum_over_ranks(g, ctx.group) / group_info(ctx.group)[1], None


def replicated_mean_grad(x, group=None):
    """``x`` (a float or tensor every rank of ``group`` holds alike, such as a logit scale) with a
    gradient averaged over the ranks' gradients: for a loss whose value every rank computes in full
    but whose backward attributes parts of it to different ranks (the ring's blocks), each rank
    then reads the gradient of the full value.  Collective in the backward; floats and tensors
    that do not require grad pass through."""
    if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() and is_distributed(group)):
        return x
    return _ReplicatedMeanGrad.apply(x, group)


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` in rank order; the backward sums into the owner.

    The gradient that each rank's loss sends to the rows gathered from rank ``r`` is summed over
    ranks and delivered to rank ``r`` (reduce-scatter semantics, not divided by the world size),
    so ``sum_r L_r`` differentiates exactly as on one process.  Call it on every rank of ``group``.

    Args:
        x: (n_r, *rest) tensor of any dtype; ``n_r`` may differ between ranks, ``rest`` and the
            dtype may not (checked on every rank first).
        group: process group; default the world.  Without torch.distributed initialised, or with
            one rank, ``x`` is returned unchanged.

    Returns:
        (sum_r n_r, *rest) tensor, same dtype and device as ``x``.

    Raises:
        RuntimeError on every rank when the ranks disagree on ``rest`` or dtype, or a shard is empty.
    """
    if not is_distributed(group):
        group_info(group)
        _check_tensor(x)
        return x
    sizes = exchange_shapes([("x", x)], group, _tensor_error(x))[0]
    return gather_with_sizes(x, sizes, group)


def gather_with_sizes(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """``all_gather_with_grad`` when the dim-0 ``sizes`` (one per rank) are already known and checked.

    Args:
        x: (sizes[rank], *rest) tensor.
        sizes: dim-0 size on every rank of ``group``.

    Returns:
        (sum(sizes), *rest) tensor, differentiable (reduce-scatter backward).
    """
    if len(sizes) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group, list(sizes))


def all_gather_no_grad(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """(sum(sizes), *rest) concatenation over ranks of ``x`` (sizes[rank], *rest), without gradient."""
    if len(sizes) == 1:
        return x.detach()
    return _gather_padded(x, sizes, group)


def all_reduce_with_grad(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group``, differentiable: the backward is the sum of gradients.

    Args:
        x: tensor of the same shape and dtype on every rank (checked on every rank first, an
            exchange of a few integers; floating, to carry a gradient).

    Returns:
        Tensor of ``x``'s shape, dtype and device; ``x`` itself on one rank.

    Raises:
        RuntimeError on every rank when the ranks disagree on the shape or dtype.
    """
    if not is_distributed(group):
        _check_tensor(x)
        return x
    err = _tensor_error(x)
    shape = "?" if err else str(tuple(x.shape)).replace(" ", "")
    exchange_shapes([], group, err, [("x's shape", shape), ("x's dtype", "?" if err else str(x.dtype)[6:])],
                    like=None if err else x, grad_inputs=[("x", x)])
    return all_reduce_checked(x, group)


def all_reduce_checked(x: Tensor, group=None) -> Tensor:
    """``all_reduce_with_grad`` for a caller whose ranks hold ``x`` of one shape and dtype by
    construction (no exchange first)."""
    if not is_distributed(group):
        return x
    return _AllReduceWithGrad.apply(x, group)


class Ring:
    """Neighbour exchange around the ranks of ``group``: send to rank+1, receive from rank-1.

    ``exchange`` posts every send and receive of one step at once (``batch_isend_irecv``) and
    returns immediately, so the caller computes on the current block while the next one travels.
    Every rank must post the same sequence of exchanges.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_info(group)
        self.next = (self.rank + 1) % self.world
        self.prev = (self.rank - 1) % self.world
        # P2POp's peer is a global rank (its group_peer keyword is new in torch 2.6)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next_global, self.prev_global = to_global(self.next), to_global(self.prev)

    def origin(self, step: int) -> int:
        """Group rank whose shard this rank holds at ``step`` of the ring (step 0: its own)."""
        return (self.rank - step) % self.world

    def exchange(self, sends: Sequence[Tensor], recv_like: Sequence[Tuple[tuple, torch.dtype]]):
        """Post isend of ``sends`` to the next rank and irecv of buffers shaped ``recv_like`` from the
        previous one.  Returns ``(works, received)``; call ``wait(works)`` before reading ``received``
        or overwriting a sent tensor."""
        ops, received = [], []
        device = sends[0].device
        if device.type != "cpu" and _uses("gloo", self.group):
            # Every rank holds the same kind of tensors, so every rank raises here: no hang.
            raise RuntimeError(f"the ring exchanges {device.type} tensors with point-to-point sends, which the gloo "
                               "backend supports for CPU tensors only; use the NCCL backend, or dist_impl='gather'")
        for t in sends:
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next_global, group=self.group))
        for shape, dtype in recv_like:
            buf = torch.empty(shape, dtype=dtype, device=device)
            received.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, self.prev_global, group=self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        # Keep the (possibly copied) send buffers alive until the wait.
        return (works, [op.tensor for op in ops]), received

    @staticmethod
    def wait(handle) -> None:
        works, _ = handle
        for w in works:
            w.wait()
