"""Body of one rank in tests/test_distributed.py: many checks per spawn, results to a JSON file.

Every check compares a distributed loss against the single-process loss of the global batch,
the way DDP sees it: each rank projects its shard with a replicated parameter, computes its
loss, runs backward; the gradients are then averaged over ranks (what DDP does) and must equal
the gradients of the global-batch loss, and the mean of the per-rank losses must equal its value.
"""
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

D_IN, D = 12, 16


def _tol(dtype=torch.float32) -> float:
    """conftest's tolerance for ``dtype`` (the one table); imported late, as this module is spawned by name."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import TOL
    return TOL[dtype]


def rel_err(out, ref) -> float:
    """||out - ref|| / max(||ref||, 1e-2): relative, but absolute for gradients that are exactly 0
    analytically (a bias under softmax cross-entropy: sums of O(1) terms that cancel to ~1e-7)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-2))


class Checker:
    def __init__(self, rank):
        self.rank, self.failures, self.passed = rank, [], []

    def run(self, name, fn):
        try:
            fn()
            self.passed.append(name)
        except Exception:  # recorded, reported by the parent test
            self.failures.append(f"{name}: {traceback.format_exc(limit=4)}")

    @staticmethod
    def close(out, ref, what, tol=None):
        err, tol = rel_err(out, ref), tol or _tol()
        assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"


def make_params(gen, bias=None):
    p = {"proj": torch.randn(D_IN, D, generator=gen) / D_IN ** 0.5, "scale": torch.tensor(4.0)}
    if bias is not None:
        p["bias"] = torch.tensor(bias)
    return p


def ddp_compare(ck, name, dist_fn, ref_fn, inputs, sizes, params, group, weighted=False):
    """``dist_fn(local inputs, params)`` on every rank of ``group`` vs ``ref_fn(global inputs, params)``.

    ``weighted``: scale each rank's loss by n_r * W / B so uneven shards still average to the
    global mean (the per-rank loss is a mean over local rows)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    off, n, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    local = [x[off:off + n] for x in inputs]
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = dist_fn(local, p)
    if weighted:
        loss = loss * (n * world / total)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    mean_loss /= world
    grads = {}
    for k, v in p.items():
        g = v.grad.clone()
        dist.all_reduce(g, group=group)  # DDP: average the parameter gradients
        grads[k] = g / world
    q = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref = ref_fn(inputs, q)
    ref.backward()
    ck.close(mean_loss, ref.detach(), f"{name} loss")
    for k in p:
        ck.close(grads[k], q[k].grad, f"{name} grad {k}")


def _ref_clip_rank(i_all, t_all, s, b, eps, sizes, r, local):
    """Rank ``r``'s open_clip ClipLoss in plain float64 PyTorch, as a function of the global batch:
    with ``local``, rows ``off..off+n`` of both directions with labels ``arange(n) + off``; else
    the global loss (every rank's value)."""
    ce = torch.nn.functional.cross_entropy
    logits = s * i_all @ t_all.T + (0.0 if b is None else b)
    rows = slice(sum(sizes[:r]), sum(sizes[:r + 1])) if local else slice(None)
    labels = torch.arange(i_all.shape[0])[rows]
    return 0.5 * (ce(logits[rows], labels, label_smoothing=eps) + ce(logits.T[rows], labels, label_smoothing=eps))


def _ref_siglip_rank(i_all, t_all, s, b, sizes, r):
    """Rank ``r``'s open_clip SigLipLoss in plain float64 PyTorch: its images against every text,
    +1 only on its own pairs, summed and divided by its own row count (not by the world size)."""
    off, n = sum(sizes[:r]), sizes[r]
    logits = s * i_all[off:off + n] @ t_all.T + b
    z = -torch.ones_like(logits)
    z[torch.arange(n), off + torch.arange(n)] = 1.0
    return -torch.nn.functional.logsigmoid(z * logits).sum() / n


def per_rank_checks(ck, rank, world):
    """Each rank's own loss value and own gradients (features, logit scale and bias), before any
    DDP averaging, against a float64 single-process reference of the same global batch: odd, uneven
    shards and an odd D, fresh data.  ``ddp_compare`` reads only means over ranks, which cannot tell
    local_loss=True from the global loss, nor a wrong rank offset that equal shards hide.

    Feature gradients: what rank r's rows receive is the gradient of the sum over ranks of the
    per-rank losses (a gathered copy sends its gradient home), or, for open_clip's gradient-free
    gather, of rank r's own loss through its own rows only."""
    from fastcl.losses.distributed import clip_loss_distributed, siglip_loss_distributed
    gen = torch.Generator().manual_seed(2027)
    sizes = [3 + 2 * r for r in range(world)]  # odd and uneven: 3, 5 (, 7, 9)
    off, n, d = sum(sizes[:rank]), sizes[rank], 7
    i_all = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64) / 2
    t_all = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64) / 2
    s0, b0 = torch.tensor(3.7, dtype=torch.float64), torch.tensor(-2.3, dtype=torch.float64)
    tol = _tol(torch.float64)

    def compare(name, dist_fn, ref_fn, feat_grad="sum", scalar_grad="own", bias=True):
        x_i, x_t = i_all[off:off + n].clone().requires_grad_(), t_all[off:off + n].clone().requires_grad_()
        s, b = s0.clone().requires_grad_(), (b0.clone().requires_grad_() if bias else None)
        loss = dist_fn(x_i, x_t, s, b)
        loss.backward()
        gi, gt = i_all.clone().requires_grad_(), t_all.clone().requires_grad_()
        rs, rb = s0.clone().requires_grad_(), (b0.clone().requires_grad_() if bias else None)
        refs = [ref_fn(gi, gt, rs, rb, r) for r in range(world)]
        ck.close(loss, refs[rank], f"{name} loss of rank {rank}", tol)
        wrt = [gi, gt, rs] + ([rb] if bias else [])
        if feat_grad == "sum":  # every rank's loss sends its gradient home
            g = torch.autograd.grad(sum(refs), wrt, retain_graph=True)
        else:  # "own": only this rank's loss, through its own rows
            g = torch.autograd.grad(refs[rank], wrt, retain_graph=True)
        ck.close(x_i.grad, g[0][off:off + n], f"{name} image grad", tol)
        ck.close(x_t.grad, g[1][off:off + n], f"{name} text grad", tol)
        scalars = [(s, "scale")] + ([(b, "bias")] if bias else [])
        own = torch.autograd.grad(refs[rank], wrt[2:], retain_graph=True)
        total = torch.autograd.grad(sum(refs), wrt[2:])
        for k, (v, what) in enumerate(scalars):
            got = v.grad.clone()
            if scalar_grad == "sum":  # only the sum over ranks is defined (the ring's attribution)
                dist.all_reduce(got)
            ck.close(got, (own if scalar_grad == "own" else total)[k], f"{name} {what} grad", tol)

    for impl in ("gather", "ring"):
        # local_loss=True: this rank's rows against all columns, labels offset by the uneven shards
        ck.run(f"per rank clip {impl} local_loss=True", lambda impl=impl: compare(
            f"clip {impl} local", lambda i, t, s, b: clip_loss_distributed(i, t, s, b, dist_impl=impl),
            lambda i, t, s, b, r: _ref_clip_rank(i, t, s, b, 0.0, sizes, r, True),
            scalar_grad="own" if impl == "gather" else "sum"))
        # local_loss=False: the global loss on every rank, its scale and bias gradients too;
        # label smoothing's mean logit runs over every rank's columns
        ck.run(f"per rank clip {impl} local_loss=False smoothing", lambda impl=impl: compare(
            f"clip {impl} global", lambda i, t, s, b: clip_loss_distributed(
                i, t, s, b, local_loss=False, dist_impl=impl, label_smoothing=0.2),
            lambda i, t, s, b, r: _ref_clip_rank(i, t, s, b, 0.2, sizes, r, False)))
        ck.run(f"per rank siglip {impl}", lambda impl=impl: compare(
            f"siglip {impl}", lambda i, t, s, b: siglip_loss_distributed(i, t, s, b, dist_impl=impl),
            lambda i, t, s, b, r: _ref_siglip_rank(i, t, s, b, sizes, r)))
    # open_clip's gradient-free gather, global loss: only this rank's own rows carry a gradient
    ck.run("per rank clip gather_with_grad=False local_loss=False", lambda: compare(
        "clip no-grad gather global", lambda i, t, s, b: clip_loss_distributed(
            i, t, s, b, local_loss=False, gather_with_grad=False, label_smoothing=0.1),
        lambda i, t, s, b, r: _ref_clip_rank(i, t, s, b, 0.1, sizes, r, False), feat_grad="own"))


def checks(ck, rank, world, tmp):
    import fastcl
    from fastcl.distributed import all_gather_with_grad, all_reduce_with_grad
    from fastcl.losses.distributed import (clip_loss_distributed, dcl_loss_distributed, ntxent_loss_distributed,
                                           siglip_loss_distributed, supcon_loss_distributed)
    from fastcl.nn import ClipLoss, CoCaLoss, DCLLoss, NTXentLoss, SigLipLoss, SupConLoss

    gen = torch.Generator().manual_seed(1234)  # identical global data on every rank
    b = 6
    sizes = [b] * world
    B = sum(sizes)
    img, txt = torch.randn(B, D_IN, generator=gen), torch.randn(B, D_IN, generator=gen)
    params = make_params(gen, bias=-1.5)

    def enc(x, p):
        return x @ p["proj"]

    # ---- CLIP: open_clip local_loss/gather_with_grad, both implementations ----
    def ref_clip(x, p, smooth=0.0, bias=False):
        return fastcl.clip_loss(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"] if bias else None,
                                label_smoothing=smooth)

    for impl in ("gather", "ring"):
        for local in (True, False):
            ck.run(f"clip {impl} local_loss={local}", lambda impl=impl, local=local: ddp_compare(
                ck, f"clip {impl} local={local}",
                lambda x, p: clip_loss_distributed(enc(x[0], p), enc(x[1], p), p["scale"], local_loss=local,
                                                   dist_impl=impl),
                ref_clip, [img, txt], sizes, {k: params[k] for k in ("proj", "scale")}, None))
        ck.run(f"clip module {impl} bias+smoothing", lambda impl=impl: ddp_compare(
            ck, f"clip module {impl}",
            lambda x, p: ClipLoss(True, True, False, rank, world, dist_impl=impl, label_smoothing=0.1)(
                enc(x[0], p), enc(x[1], p), p["scale"], p["bias"]),
            lambda x, p: ref_clip(x, p, 0.1, True), [img, txt], sizes, params, None))

    def scale_grads_per_rank():
        """The logit scale's gradient on each rank, before any averaging.  local_loss=False: every
        rank reads the global loss's gradient (open_clip's full-matrix loss), on both
        implementations.  local_loss=True: the gather gives open_clip's split (this rank's rows and
        columns); the ring attributes the column terms by query rows instead, so only the sum
        over ranks (what DDP's averaging reads) is the same."""
        off, n = sum(sizes[:rank]), sizes[rank]
        x_i, x_t = enc(img[off:off + n], params), enc(txt[off:off + n], params)
        ref_scale = params["scale"].clone().requires_grad_()
        fastcl.clip_loss(enc(img, params), enc(txt, params), ref_scale).backward()
        for local in (True, False):
            got = {}
            for impl in ("gather", "ring"):
                scale = params["scale"].clone().requires_grad_()
                clip_loss_distributed(x_i, x_t, scale, local_loss=local, dist_impl=impl).backward()
                got[impl] = scale.grad
            if local:
                sums = [g.clone() for g in (got["gather"], got["ring"])]
                for t in sums:
                    dist.all_reduce(t)
                ck.close(sums[1], sums[0], "ring vs gather scale grad summed over ranks (local_loss)")
                ck.close(sums[0] / world, ref_scale.grad, "gather scale grad mean over ranks (local_loss)")
            else:
                ck.close(got["gather"], ref_scale.grad, "gather scale grad per rank (global loss)")
                ck.close(got["ring"], ref_scale.grad, "ring scale grad per rank (global loss)")
    ck.run("clip scale grads per rank", scale_grads_per_rank)

    # CoCa: the CLIP term across ranks, the caption cross-entropy local (equal shards, no padding,
    # so DDP's mean of the local means is the global mean)
    cap, cap_labels = torch.randn(B, 3 * 11, generator=gen), torch.randint(1, 11, (B, 3), generator=gen).double()

    def ref_coca(x, p):
        ce = torch.nn.functional.cross_entropy((x[2] * p["scale"]).reshape(-1, 3, 11).permute(0, 2, 1), x[3].long())
        return 2.0 * ref_clip(x, p) + 0.5 * ce

    ck.run("coca module gather", lambda: ddp_compare(
        ck, "coca module",
        lambda x, p: sum(CoCaLoss(0.5, 2.0, 0, True, True, False, rank, world)(
            enc(x[0], p), enc(x[1], p), (x[2] * p["scale"]).reshape(-1, 3, 11), x[3].long(), p["scale"])),
        ref_coca, [img, txt, cap, cap_labels], sizes, {k: params[k] for k in ("proj", "scale")}, None))

    # the ring without the extension: each block materialised in plain PyTorch
    ck.run("clip ring reference backend", lambda: ddp_compare(
        ck, "clip ring reference",
        lambda x, p: clip_loss_distributed(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"], dist_impl="ring",
                                           backend="reference"),
        lambda x, p: ref_clip(x, p, 0.0, True), [img, txt], sizes, params, None))
    ck.run("siglip ring reference backend", lambda: ddp_compare(
        ck, "siglip ring reference",
        lambda x, p: siglip_loss_distributed(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"], backend="reference"),
        lambda x, p: fastcl.siglip_loss(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"]),
        [img, txt], sizes, params, None))

    # gather_with_grad=False keeps open_clip's gradient-free gather: compare with a literal version.
    def clip_no_grad_gather():
        off = rank * b
        i_loc = enc(img[off:off + b], {"proj": params["proj"]}).requires_grad_()
        t_loc = enc(txt[off:off + b], {"proj": params["proj"]}).requires_grad_()
        loss = ClipLoss(True, False, False, rank, world)(i_loc, t_loc, params["scale"])
        loss.backward()
        gi, gt = [torch.empty_like(i_loc) for _ in range(world)], [torch.empty_like(t_loc) for _ in range(world)]
        dist.all_gather(gi, i_loc.detach())
        dist.all_gather(gt, t_loc.detach())
        i_ref, t_ref = i_loc.detach().clone().requires_grad_(), t_loc.detach().clone().requires_grad_()
        labels = torch.arange(b) + off
        ce = torch.nn.functional.cross_entropy
        ref = 0.5 * (ce(params["scale"] * i_ref @ torch.cat(gt).T, labels)
                     + ce(params["scale"] * t_ref @ torch.cat(gi).T, labels))
        ref.backward()
        ck.close(loss.detach(), ref.detach(), "clip no-grad gather loss")
        ck.close(i_loc.grad, i_ref.grad, "clip no-grad gather image grad")
        ck.close(t_loc.grad, t_ref.grad, "clip no-grad gather text grad")
    ck.run("clip gather_with_grad=False", clip_no_grad_gather)

    # ---- SigLIP: per-rank loss not divided by the world size ----
    for impl in ("gather", "ring", "bidir"):
        ck.run(f"siglip {impl}", lambda impl=impl: ddp_compare(
            ck, f"siglip {impl}",
            lambda x, p: SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(
                enc(x[0], p), enc(x[1], p), p["scale"], p["bias"]),
            lambda x, p: fastcl.siglip_loss(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"]),
            [img, txt], sizes, params, None))

    # ---- NT-Xent: lightly gather_distributed ----
    temp = torch.tensor(0.3)
    for impl in ("gather", "ring"):
        ck.run(f"ntxent {impl}", lambda impl=impl: ddp_compare(
            ck, f"ntxent {impl}",
            lambda x, p: NTXentLoss(0.3, gather_distributed=True, dist_impl=impl)(enc(x[0], p), enc(x[1], p)),
            lambda x, p: fastcl.ntxent_loss(enc(x[0], p), enc(x[1], p), temp),
            [img, txt], sizes, {"proj": params["proj"]}, None))

    # ---- DCL: lightly gather_distributed, both negative aggregations, DCLW weights ----
    def row_weight(x, y):  # per-row, so a shard's weights equal the global batch's
        return 1.0 + ((x - y) ** 2).sum(1)
    for impl in ("gather", "ring"):
        for neg in ("union", "separate"):
            name = f"dcl {impl} {neg}"
            ck.run(name, lambda impl=impl, neg=neg, name=name: ddp_compare(
                ck, name,
                lambda x, p: DCLLoss(0.3, row_weight, True, negatives=neg, dist_impl=impl)(enc(x[0], p), enc(x[1], p)),
                lambda x, p: fastcl.dcl_loss(enc(x[0], p), enc(x[1], p), temp, row_weight, negatives=neg),
                [img, txt], sizes, {"proj": params["proj"]}, None))

    # ---- SupCon across ranks: labels shared between ranks, SimCLR form, mode "one" ----
    views = torch.randn(B, 2, D_IN, generator=gen)
    labels = torch.randint(0, 4, (B,), generator=gen)
    for impl in ("gather", "ring"):
        for use_labels, mode in ((True, "all"), (False, "all"), (True, "one")):
            name = f"supcon {impl} labels={use_labels} mode={mode}"
            ck.run(name, lambda impl=impl, use_labels=use_labels, mode=mode, name=name: ddp_compare(
                ck, name,
                lambda x, p: SupConLoss(0.2, mode, 0.1, gather_distributed=True, dist_impl=impl)(
                    enc(x[0], p), x[1] if use_labels else None),
                lambda x, p: fastcl.supcon_loss(enc(x[0], p), x[1] if use_labels else None, None, 0.2, 0.1, mode),
                [views, labels], sizes, {"proj": params["proj"]}, None))

    # float labels compare by value on every rank, as in one process
    for impl in ("gather", "ring"):
        name = f"supcon {impl} float labels"
        ck.run(name, lambda impl=impl, name=name: ddp_compare(
            ck, name,
            lambda x, p: supcon_loss_distributed(enc(x[0], p), x[1], 0.2, 0.1, dist_impl=impl),
            lambda x, p: fastcl.supcon_loss(enc(x[0], p), x[1], None, 0.2, 0.1),
            [views, labels.double() / 2], sizes, {"proj": params["proj"]}, None))

    def published(call, bad_rank, exc, match):
        """Runner: ``call()`` raises ``exc`` with ``match`` on ``bad_rank`` and, on every other
        rank, the RuntimeError that names that rank (never a hang)."""
        def run():
            try:
                call()
            except Exception as e:
                if rank == bad_rank:
                    assert isinstance(e, exc) and match in str(e), repr(e)
                else:
                    assert isinstance(e, RuntimeError) and f"rank(s) [{bad_rank}]" in str(e), repr(e)
            else:
                raise AssertionError("no error raised")
        return run

    # ---- the memory bank with gather_distributed: every rank enqueues all ranks' out1, in rank order ----
    def bank_gathers():
        torch.manual_seed(0)  # the same initial bank on every rank
        crit = NTXentLoss(0.5, memory_bank_size=(3 * B, D_IN), gather_distributed=True)
        initial = crit.memory_bank.bank.clone()
        off = sum(sizes[:rank])
        out0 = img[off:off + b].clone().requires_grad_()
        loss = crit(out0, txt[off:off + b])
        ck.close(loss, fastcl.losses.ntxent.ntxent_bank_loss(out0, txt[off:off + b], initial, 0.5), "bank loss")
        ck.close(crit.memory_bank.bank[:B], torch.nn.functional.normalize(txt, dim=1), "bank rows of every rank")
        assert torch.equal(crit.memory_bank.bank[B:], initial[B:]) and crit.memory_bank.ptr == B
    ck.run("memory bank gather_distributed", bank_gathers)

    # a bad input on one rank raises on all, not a hang in the enqueue
    bank_crit = NTXentLoss(0.5, memory_bank_size=(3 * B, D_IN), gather_distributed=True)
    ck.run("memory bank error published", published(
        lambda: bank_crit(img[:b].clone().requires_grad_(), txt[:b].double() if rank == 1 else txt[:b]),
        1, TypeError, "dtype"))

    # ---- uneven shard sizes (gather, and the ring too) ----
    un = [3, 5, 4, 6][:world]
    Bu = sum(un)
    img_u, txt_u = img[:Bu], txt[:Bu]
    for impl in ("gather", "ring"):
        ck.run(f"uneven clip {impl}", lambda impl=impl: ddp_compare(
            ck, f"uneven clip {impl}",
            lambda x, p: clip_loss_distributed(enc(x[0], p), enc(x[1], p), p["scale"], dist_impl=impl),
            ref_clip, [img_u, txt_u], un, {k: params[k] for k in ("proj", "scale")}, None, weighted=True))
        ck.run(f"uneven ntxent {impl}", lambda impl=impl: ddp_compare(
            ck, f"uneven ntxent {impl}",
            lambda x, p: ntxent_loss_distributed(enc(x[0], p), enc(x[1], p), temp, dist_impl=impl),
            lambda x, p: fastcl.ntxent_loss(enc(x[0], p), enc(x[1], p), temp),
            [img_u, txt_u], un, {"proj": params["proj"]}, None, weighted=True))
        for neg in ("union", "separate"):
            name = f"uneven dcl {impl} {neg}"
            ck.run(name, lambda impl=impl, neg=neg, name=name: ddp_compare(
                ck, name,
                lambda x, p: dcl_loss_distributed(enc(x[0], p), enc(x[1], p), temp, negatives=neg, dist_impl=impl),
                lambda x, p: fastcl.dcl_loss(enc(x[0], p), enc(x[1], p), temp, negatives=neg),
                [img_u, txt_u], un, {"proj": params["proj"]}, None, weighted=True))
    ck.run("uneven supcon gather", lambda: ddp_compare(
        ck, "uneven supcon gather",
        lambda x, p: supcon_loss_distributed(enc(x[0], p), x[1], 0.2, 0.1, dist_impl="gather"),
        lambda x, p: fastcl.supcon_loss(enc(x[0], p), x[1], None, 0.2, 0.1),
        [views[:Bu], labels[:Bu]], un, {"proj": params["proj"]}, None, weighted=True))

    per_rank_checks(ck, rank, world)

    # ---- all_gather_with_grad itself: uneven sizes, non-contiguous upstream gradient, no 1/W ----
    def gather_grad():
        off, n = sum(un[:rank]), un[rank]
        x = img_u[off:off + n].clone().requires_grad_()
        y = all_gather_with_grad(x)
        assert torch.equal(y, img_u), "gathered rows out of rank order"
        weights = torch.randn(D_IN, Bu, generator=torch.Generator().manual_seed(7))
        (y.t() * weights).sum().backward()  # the gradient reaching y is a transposed view
        ck.close(x.grad, world * weights.t()[off:off + n], "all_gather_with_grad backward")
    ck.run("all_gather_with_grad", gather_grad)

    # ---- a custom subgroup: odd ranks (or both ranks reversed-order-free for W=2) ----
    members = [r for r in range(world) if r % 2 == 1] if world >= 4 else list(range(world))
    others = [r for r in range(world) if r not in members]
    sub = dist.new_group(members)
    if others:
        dist.new_group(others)  # every rank takes part in every new_group call
    if rank in members:
        sub_sizes = [4 + i for i in range(len(members))]
        sB = sum(sub_sizes)
        for impl in ("gather", "ring"):
            ck.run(f"subgroup clip {impl}", lambda impl=impl: ddp_compare(
                ck, f"subgroup clip {impl}",
                lambda x, p: ClipLoss(True, True, False, dist.get_rank(sub), len(members), dist_impl=impl,
                                      group=sub)(enc(x[0], p), enc(x[1], p), p["scale"]),
                ref_clip, [img[:sB], txt[:sB]], sub_sizes, {k: params[k] for k in ("proj", "scale")}, sub,
                weighted=True))
            ck.run(f"subgroup siglip {impl}", lambda impl=impl: ddp_compare(
                ck, f"subgroup siglip {impl}",
                lambda x, p: siglip_loss_distributed(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"],
                                                     dist_impl=impl, group=sub),
                lambda x, p: fastcl.siglip_loss(enc(x[0], p), enc(x[1], p), p["scale"], p["bias"]),
                [img[:len(members) * 4], txt[:len(members) * 4]], [4] * len(members), params, sub))

    # ---- mismatches raise on every rank (never hang) ----
    def mismatch(make, match):
        def run():
            try:
                make()
            except RuntimeError as e:
                assert match in str(e), f"unexpected message: {e}"
            else:
                raise AssertionError("no error raised")
        return run
    d_bad = D + (rank == world - 1)
    a = torch.randn(4, d_bad)
    ck.run("D mismatch all_gather", mismatch(lambda: all_gather_with_grad(a), "same trailing shape"))
    for impl in ("gather", "ring"):
        ck.run(f"D mismatch clip {impl}", mismatch(lambda impl=impl: clip_loss_distributed(a, a, 2.0, dist_impl=impl),
                                                   "same trailing shape"))
        ck.run(f"D mismatch dcl {impl}", mismatch(lambda impl=impl: dcl_loss_distributed(a, a, dist_impl=impl),
                                                  "same trailing shape"))
    # an empty shard on one rank raises on every rank: exchange_shapes' check, as the functions
    # whose own checks allow empty inputs (all_gather_with_grad, supcon's features) would not
    empty = torch.randn(0 if rank == world - 1 else 3, 2, D)
    ck.run("empty shard raises on every rank", lambda: (
        mismatch(lambda: all_gather_with_grad(empty[:, 0]), "x must be non-empty on every rank")(),
        mismatch(lambda: supcon_loss_distributed(empty, dist_impl="ring"), "features must be non-empty")()))
    a_dt = torch.randn(4, D, dtype=torch.float64 if rank == 0 else torch.float32)
    ck.run("dtype mismatch ntxent", mismatch(lambda: ntxent_loss_distributed(a_dt, a_dt, dist_impl="ring"),
                                             "dtype"))
    # a local argument error on one rank makes the others raise too
    bad_scale = -1.0 if rank == 0 else 2.0
    ck.run("local error published", published(
        lambda: siglip_loss_distributed(a_dt.float(), a_dt.float(), bad_scale, 0.0), 0, ValueError, "logit_scale"))

    # DCL's own arguments (negatives, weight_fn's output) checked on one rank, raised on all
    def dcl_on_rank0(impl, **bad_kw):
        return lambda: dcl_loss_distributed(a_dt.float(), a_dt.float(), dist_impl=impl, **(bad_kw if rank == 0 else {}))
    for impl in ("gather", "ring"):
        ck.run(f"dcl negatives error published {impl}",
               published(dcl_on_rank0(impl, negatives="sum"), 0, ValueError, "negatives"))
    ck.run("dcl weight_fn error published",
           published(dcl_on_rank0("gather", weight_fn=lambda x, y: torch.ones(x.shape[0] + 1)), 0, ValueError,
                     "weight_fn"))

    def failing_weight_fn(x, y):  # a user's callable may raise anything, on one rank only
        raise RuntimeError("weight_fn broke")
    ck.run("dcl weight_fn exception published",
           published(dcl_on_rank0("gather", weight_fn=failing_weight_fn), 0, RuntimeError, "weight_fn broke"))

    # ---- settings every rank must share: a difference raises on every rank (the ring used to give
    # wrong gradients with another rank's scale, and differing flags left ranks in different
    # collectives) ----
    def own(v0, v1):  # rank 0's value, and every other rank's
        return v0 if rank == 0 else v1
    x4, lab4 = torch.randn(4, D), torch.arange(4) % 2
    f4 = torch.stack([x4, x4.flip(0)], 1)  # (4, 2, D)
    for impl in ("gather", "ring"):
        ck.run(f"scale differs clip {impl}", mismatch(
            lambda impl=impl: clip_loss_distributed(x4, x4, own(2.0, 5.0), dist_impl=impl),
            "logit_scale must be the same on every rank"))
        ck.run(f"scale tensor differs siglip {impl}", mismatch(
            lambda impl=impl: siglip_loss_distributed(x4, x4, torch.tensor(own(2.0, 5.0)), -1.0, dist_impl=impl),
            "rank 0: 2.0, rank 1: 5.0"))
        ck.run(f"bias differs clip {impl}", mismatch(
            lambda impl=impl: clip_loss_distributed(x4, x4, 2.0, own(None, 0.5), dist_impl=impl),
            "logit_bias must be the same"))
        ck.run(f"temperature differs ntxent {impl}", mismatch(
            lambda impl=impl: ntxent_loss_distributed(x4, x4, torch.tensor(own(0.1, 0.2)), dist_impl=impl),
            "temperature must be the same"))
        ck.run(f"negatives differ dcl {impl}", mismatch(
            lambda impl=impl: dcl_loss_distributed(x4, x4, negatives=own("union", "separate"), dist_impl=impl),
            "negatives must be the same"))
        ck.run(f"contrast_mode differs supcon {impl}", mismatch(
            lambda impl=impl: supcon_loss_distributed(f4, lab4, contrast_mode=own("all", "one"), dist_impl=impl),
            "contrast_mode must be the same"))
    ck.run("dist_impl differs clip", mismatch(
        lambda: clip_loss_distributed(x4, x4, 2.0, dist_impl=own("gather", "ring")),
        "dist_impl must be the same on every rank of the group; got rank 0: 'gather', rank 1: 'ring'"))
    ck.run("local_loss differs clip ring", mismatch(
        lambda: clip_loss_distributed(x4, x4, 2.0, local_loss=own(True, False), dist_impl="ring"),
        "local_loss must be the same"))
    ck.run("gather_with_grad differs clip", mismatch(
        lambda: clip_loss_distributed(x4, x4, 2.0, gather_with_grad=own(True, False)),
        "gather_with_grad must be the same"))
    ck.run("label_smoothing differs clip ring", mismatch(
        lambda: clip_loss_distributed(x4, x4, 2.0, label_smoothing=own(0.1, 0.0), dist_impl="ring"),
        "label_smoothing must be the same"))

    def aliases_agree():  # open_clip's "bidir" and "shift" are both the ring
        got = siglip_loss_distributed(x4, x4, 2.0, -1.0, dist_impl=own("bidir", "shift"))
        ck.close(got, siglip_loss_distributed(x4, x4, 2.0, -1.0, dist_impl="ring"), "siglip aliases")
    ck.run("siglip aliases agree", aliases_agree)

    # ---- argument errors found on one rank before the exchange are published too ----
    ck.run("label_smoothing error published", published(
        lambda: clip_loss_distributed(x4, x4, 2.0, label_smoothing=own(1.5, 0.0)), 0, ValueError, "label_smoothing"))
    ck.run("ring without gather_with_grad published", published(
        lambda: clip_loss_distributed(x4, x4, 2.0, dist_impl="ring", gather_with_grad=own(False, True)), 0,
        ValueError, "gather_with_grad"))
    ck.run("bad dist_impl published", published(
        lambda: ntxent_loss_distributed(x4, x4, dist_impl=own("rign", "ring")), 0, ValueError, "dist_impl"))
    for impl in ("gather", "ring"):
        ck.run(f"unusable backend published {impl}", published(
            lambda impl=impl: clip_loss_distributed(x4, x4, 2.0, dist_impl=impl, backend=own("cuda", None)), 0,
            ValueError, "backend='cuda' needs CUDA tensors"))
    ck.run("SupConLoss misplaced ref_emb published", published(
        lambda: SupConLoss(gather_distributed=True)(f4, lab4, ref_emb=own(x4, None)), 0, ValueError,
        "go with 2-D embeddings"))
    ck.run("SupConLoss mask published", published(
        lambda: SupConLoss(gather_distributed=True)(f4, lab4, own(torch.ones(4, 4), None)), 0, ValueError,
        "takes labels, not mask"))
    ck.run("all_gather non-tensor published", published(
        lambda: all_gather_with_grad(own([1.0], x4)), 0, TypeError, "torch.Tensor"))
    ck.run("all_reduce shape differs", mismatch(lambda: all_reduce_with_grad(torch.ones(own(3, 4))),
                                                "x's shape must be the same on every rank of the group; got rank 0: "
                                                "'(3,)', rank 1: '(4,)'"))

    def all_reduce_6d():
        out = all_reduce_with_grad(torch.ones(1, 2, 1, 1, 1, 2))
        assert torch.equal(out, torch.full((1, 2, 1, 1, 1, 2), float(world))), out
    ck.run("all_reduce 6-D", all_reduce_6d)
    ck.run("flag given as a tensor differs", mismatch(
        lambda: clip_loss_distributed(x4, x4, 2.0, local_loss=torch.tensor(rank == 0), dist_impl="ring"),
        "local_loss must be the same"))

    def same_values_agree():  # numbers compare by value: 1 and 1.0, True and 1, -0.0 and no bias, NaN and NaN
        for kw in (dict(temperature=own(1, 1.0)), dict(temperature=own(torch.tensor(0.5), 0.5))):
            ntxent_loss_distributed(x4, x4, **kw)
        clip_loss_distributed(x4, x4, 2.0, own(-0.0, None), local_loss=own(True, 1))
        assert torch.isnan(clip_loss_distributed(x4, x4, 2.0, own(float("nan"), -float("nan"))))
    ck.run("equal settings of different types agree", same_values_agree)
    ck.run("scale on another device published", published(
        lambda: clip_loss_distributed(x4, x4, own(torch.tensor(2.0, device="meta"), 2.0)), 0, ValueError,
        "logit_scale must be on the inputs' device (cpu), got meta"))

    def unencodable():  # the losses refuse such a setting first; the exchange itself still publishes
        from fastcl.distributed import exchange_shapes
        exchange_shapes([("x", x4)], settings=[("s", own(torch.tensor(2.0, device="meta"), 2.0))])
    ck.run("unencodable setting published", published(unencodable, 0, NotImplementedError, "meta"))

    def forgotten_rank():  # rank=0 on every process: wrong on all ranks but 0, raised on all
        try:
            ClipLoss(rank=0, world_size=world)(x4, x4, 2.0)
        except Exception as e:
            if rank == 0:
                assert isinstance(e, RuntimeError) and "rank(s) [1" in str(e), repr(e)
            else:
                assert isinstance(e, ValueError) and "do not match the process group" in str(e), repr(e)
        else:
            raise AssertionError("no error raised")
    ck.run("ClipLoss rank argument published", forgotten_rank)

    def outside_group():  # a module built for a group this rank is not in raises, not a local loss
        try:
            NTXentLoss(gather_distributed=True, group=sub)(x4, x4)
        except RuntimeError as e:
            assert "not a member" in str(e), repr(e)
        else:
            raise AssertionError("no error raised")
    if rank in others:
        ck.run("module outside its group raises", outside_group)

    def ring_refuses_device_tensors_on_gloo():  # gloo's point-to-point sends take CPU tensors only
        from fastcl.distributed import Ring
        try:
            Ring().exchange([torch.empty(2, device="meta")], [((2,), torch.float32)])
        except RuntimeError as e:
            assert "gloo backend supports for CPU tensors only" in str(e), repr(e)
        else:
            raise AssertionError("no error raised")
    ck.run("ring refuses device tensors on gloo", ring_refuses_device_tensors_on_gloo)

    def no_graph_backward_across_ranks():  # the collectives in the backward are not differentiable
        for impl in ("gather", "ring"):
            x = x4.clone().requires_grad_()
            try:
                torch.autograd.grad(clip_loss_distributed(x, x * 2, 2.0, dist_impl=impl), x, create_graph=True)
            except RuntimeError as e:
                assert "no second derivative across ranks" in str(e), repr(e)
            else:
                raise AssertionError(f"{impl}: no error raised")
    ck.run("create_graph refused across ranks", no_graph_backward_across_ranks)
    dist.barrier()
    pml_wrapper_checks(ck, rank, world)
    dist.barrier()


def mismatched_call_checks(ck, rank, world):
    """Ranks calling different distributed operations, or one with different argument lists: every
    rank raises the same RuntimeError naming what each rank called (gloo used to abort a process
    when the lists differed in length, and to compare unrelated settings when they did not)."""
    from fastcl.distributed import all_gather_with_grad, all_reduce_with_grad, exchange_shapes
    from fastcl.losses.distributed import clip_loss_distributed, ntxent_loss_distributed, siglip_loss_distributed
    from fastcl.nn import ClipLoss, NTXentLoss

    x4 = torch.randn(4, D)

    def raises(call, *matches):
        def run():
            try:
                call()
            except RuntimeError as e:
                assert all(m in str(e) for m in matches), f"unexpected message: {e}"
            else:
                raise AssertionError("no error raised")
        return run

    def on_rank0(f0, f1):  # rank 0 calls f0, every other rank f1
        return f0 if rank == 0 else f1
    different = "the ranks of the group called different distributed operations"
    clip0 = "rank 0: clip_loss_distributed (2 tensor(s), 6 setting(s))"
    ck.run("different losses clip vs siglip gather", raises(on_rank0(
        lambda: clip_loss_distributed(x4, x4, 2.0),
        lambda: siglip_loss_distributed(x4, x4, 2.0, -1.0, dist_impl="gather")),
        different, clip0, "rank 1: siglip_loss_distributed (2 tensor(s), 3 setting(s))"))
    ck.run("different losses clip vs ntxent", raises(on_rank0(
        lambda: clip_loss_distributed(x4, x4, 2.0), lambda: ntxent_loss_distributed(x4, x4)),
        different, clip0, "rank 1: ntxent_loss_distributed (2 tensor(s), 2 setting(s))"))
    ck.run("different losses ClipLoss module vs ntxent ring", raises(on_rank0(  # a module names its function
        lambda: ClipLoss(rank=rank, world_size=world)(x4, x4, 2.0),
        lambda: ntxent_loss_distributed(x4, x4, dist_impl="ring")),
        different, clip0, "rank 1: ntxent_loss_distributed"))
    ck.run("different collectives all_gather vs all_reduce", raises(on_rank0(
        lambda: all_gather_with_grad(x4), lambda: all_reduce_with_grad(x4)),
        different, "rank 0: all_gather_with_grad (1 tensor(s), 0 setting(s)), "
                   "rank 1: all_reduce_with_grad (0 tensor(s), 2 setting(s))"))
    ck.run("different losses with a local error", raises(on_rank0(  # the mismatch, not rank 0's ValueError
        lambda: clip_loss_distributed(x4, x4, -1.0), lambda: siglip_loss_distributed(x4, x4, 2.0, -1.0)),
        different))
    # the same numbers of tensors and settings: the caller's name, and the names, tell them apart
    from fastcl.losses.distributed import dcl_loss_distributed
    ck.run("different losses of one argument count", raises(on_rank0(
        lambda: siglip_loss_distributed(x4, x4, 2.0, -1.0, dist_impl="gather"),
        lambda: dcl_loss_distributed(x4, x4, dist_impl="gather")),
        different, "rank 0: siglip_loss_distributed (2 tensor(s), 3 setting(s)), "
                   "rank 1: dcl_loss_distributed (2 tensor(s), 3 setting(s))"))
    ck.run("argument names differ", raises(
        lambda: exchange_shapes([("x" if rank == 0 else "y", x4)], settings=[("s", 1.0)]),
        "passed different argument lists", "(1 tensor(s), 1 setting(s)), rank 1: "))

    def exchange(n_tensors, n_settings, d_last=3, last=0):  # d_last, last: the last tensor's D, setting's offset
        return exchange_shapes([(f"t{i}", torch.zeros(rank + 1, d_last if i == n_tensors - 1 else 3))
                                for i in range(n_tensors)],
                               settings=[(f"s{i}", i + last * (i == n_settings - 1)) for i in range(n_settings)])
    ck.run("argument lists differ in length", raises(
        lambda: exchange(2 if rank == 0 else 1, 1), "passed different argument lists",
        "(2 tensor(s), 1 setting(s)), rank 1: ", "(1 tensor(s), 1 setting(s))"))

    def long_lists():  # metadata past the fixed first message travels in a second all_gather
        assert exchange(8, 10) == [list(range(1, world + 1))] * 8
        raises(lambda: exchange(8, 10, last=rank), "s9 must be the same on every rank of the group; got "
               "rank 0: 9.0, rank 1: 10.0")()
        raises(lambda: exchange(8, 10, d_last=3 + (rank == world - 1)), "t7 must have the same trailing shape")()
        raises(lambda: exchange(8, 10 + (rank == 0)), "passed different argument lists")()
    ck.run("long argument lists", long_lists)

    # Inputs that require grad on some ranks only: their backward would run collectives on those
    # ranks alone (a hang, or a gradient summed with another tensor's), so every rank raises.
    graph = "the same inputs must require grad on every rank of the group"

    def grad_on_rank0(impl):
        def run():
            txt = torch.randn(4, D).requires_grad_(rank == 0)
            clip_loss_distributed(torch.randn(4, D, requires_grad=True), txt, 2.0, dist_impl=impl)
        return run
    for impl in ("gather", "ring"):
        ck.run(f"requires grad differs {impl}", raises(
            grad_on_rank0(impl), graph, "rank 0: [image_features, text_features], rank 1: [image_features]"))
    scale = torch.tensor(2.0, requires_grad=rank == 0)  # a tensor setting counts too
    ck.run("requires grad of a setting differs", raises(
        lambda: clip_loss_distributed(x4, x4, scale, local_loss=False), graph, "rank 0: [logit_scale], rank 1: []"))
    ck.run("requires grad differs all_reduce", raises(
        lambda: all_reduce_with_grad(torch.ones(3, requires_grad=rank == 0)), graph, "rank 0: [x], rank 1: []"))

    def no_grad_on_rank1():  # grad mode counts: rank 1 records no graph
        with torch.set_grad_enabled(rank == 0):
            clip_loss_distributed(x4.clone().requires_grad_(), x4, 2.0)
    ck.run("grad mode differs", raises(no_grad_on_rank1, graph, "rank 1: []"))

    def bank_read_on_one_rank():  # only an update is collective, as in lightly: a lone read must not wait
        crit = NTXentLoss(memory_bank_size=(8, D), gather_distributed=True)
        if rank == 0:
            with torch.no_grad():
                assert torch.isfinite(crit(torch.randn(4, D), torch.randn(4, D)))
        dist.barrier()
    ck.run("memory bank read on one rank", bank_read_on_one_rank)
    dist.barrier()


PML_WRAPPED = ("NTXentLoss", "SupConLoss", "TripletMarginLoss", "MultiSimilarityLoss", "CircleLoss", "ContrastiveLoss")


def pml_wrapper_checks(ck, rank, world):
    """fastcl.nn.pml.DistributedLossWrapper against PML's own wrapper around PML's losses, on each
    rank: the value and the gradient of this rank's embeddings (and references); uneven batches
    against the global batch's loss; mismatched arguments raise on every rank."""
    try:
        import pytorch_metric_learning.losses as pml
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper as PMLWrapper
    except ImportError:  # the peers extra is not installed: test_distributed expects none of these
        return
    import fastcl
    from fastcl.nn.pml import DistributedLossWrapper

    gen = torch.Generator().manual_seed(99)  # identical global data on every rank
    b, d = 6, 5
    emb = torch.randn(b * world, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (b * world,), generator=gen)
    ref = torch.randn(4 * world, d, generator=gen, dtype=torch.float64)
    ref_labels = torch.randint(0, 3, (4 * world,), generator=gen)
    mine = slice(rank * b, (rank + 1) * b)
    mine_ref = slice(rank * 4, (rank + 1) * 4)

    def compare(name, efficient, with_ref):
        x, y = emb[mine].clone().requires_grad_(), emb[mine].clone().requires_grad_()
        kw_x, kw_y, wrt_x, wrt_y = {}, {}, [x], [y]
        if with_ref:
            rx, ry = ref[mine_ref].clone().requires_grad_(), ref[mine_ref].clone().requires_grad_()
            kw_x, kw_y = dict(ref_emb=rx, ref_labels=ref_labels[mine_ref]), dict(ref_emb=ry, ref_labels=ref_labels[mine_ref])
            wrt_x, wrt_y = [x, rx], [y, ry]
        ours = DistributedLossWrapper(getattr(fastcl.nn.pml, name)(), efficient)(x, labels[mine], **kw_x)
        theirs = PMLWrapper(getattr(pml, name)(), efficient)(y, labels[mine], **kw_y)
        ck.close(ours, theirs, f"{name} value")
        # materialize_grads: PML's zero loss (no pairs) leaves its references out of the graph
        for g, h in zip(torch.autograd.grad(ours, wrt_x, allow_unused=True, materialize_grads=True),
                        torch.autograd.grad(theirs, wrt_y, allow_unused=True, materialize_grads=True)):
            ck.close(g, h, f"{name} grad")

    for name in PML_WRAPPED:
        for efficient in (False, True):
            ck.run(f"pml wrapper {name} efficient={efficient}", lambda n=name, e=efficient: compare(n, e, False))
    for efficient in (False, True):
        ck.run(f"pml wrapper references efficient={efficient}", lambda e=efficient: compare("NTXentLoss", e, True))

    def efficient_batch_of_one():  # PML keeps each anchor's pair with its own gathered row then
        for name in ("MultiSimilarityLoss", "ContrastiveLoss", "SupConLoss"):
            x, y = emb[rank:rank + 1].clone().requires_grad_(), emb[rank:rank + 1].clone().requires_grad_()
            ours = DistributedLossWrapper(getattr(fastcl.nn.pml, name)(), True)(x, labels[rank:rank + 1])
            theirs = PMLWrapper(getattr(pml, name)(), True)(y, labels[rank:rank + 1])
            ck.close(ours, theirs, f"{name} value")
            ck.close(torch.autograd.grad(ours, x, allow_unused=True, materialize_grads=True)[0],
                     torch.autograd.grad(theirs, y, allow_unused=True, materialize_grads=True)[0], f"{name} grad")
    ck.run("pml wrapper efficient batch of one", efficient_batch_of_one)

    def cross_batch_memory():  # two steps, the second with an enqueue mask; the memories agree too
        ours = DistributedLossWrapper(fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.ContrastiveLoss(), d, 40))
        theirs = PMLWrapper(pml.CrossBatchMemory(pml.ContrastiveLoss(), d, 40))
        for step in range(2):
            x, y = emb[mine].clone().requires_grad_(), emb[mine].clone().requires_grad_()
            mask = None if step == 0 else torch.arange(b) % 2 == 0
            lo, lt = ours(x, labels[mine], enqueue_mask=mask), theirs(y, labels[mine], enqueue_mask=mask)
            ck.close(lo, lt, f"step {step} value")
            ck.close(torch.autograd.grad(lo, x)[0], torch.autograd.grad(lt, y)[0], f"step {step} grad")
            assert torch.equal(ours.loss.embedding_memory, theirs.loss.embedding_memory)
    ck.run("pml wrapper cross batch memory", cross_batch_memory)

    def uneven():  # rank r holds 3 + r rows: world x the global batch's loss, this rank's rows' gradient
        sizes = [3 + r for r in range(world)]
        off = sum(sizes[:rank])
        x = emb[off:off + sizes[rank]].clone().requires_grad_()
        ours = DistributedLossWrapper(fastcl.nn.pml.MultiSimilarityLoss())(x, labels[off:off + sizes[rank]])
        g = emb[:sum(sizes)].clone().requires_grad_()
        ref_loss = fastcl.nn.pml.MultiSimilarityLoss()(g, labels[:sum(sizes)]) * world
        ck.close(ours, ref_loss, "uneven value")
        ck.close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref_loss, g)[0][off:off + sizes[rank]],
                 "uneven grad")
    ck.run("pml wrapper uneven batches", uneven)

    def mismatch(kwargs_for_rank, exc_here, match_here, match_others, loss=fastcl.nn.pml.NTXentLoss):
        """Every rank raises: rank 0 ``exc_here`` matching ``match_here``, the others RuntimeError."""
        try:
            DistributedLossWrapper(loss())(**kwargs_for_rank(rank))
        except Exception as e:
            exc, match = (exc_here, match_here) if rank == 0 else (RuntimeError, match_others)
            assert isinstance(e, exc) and match in str(e), repr(e)
        else:
            raise AssertionError("no error raised")
    x6 = emb[mine].float()
    given = "labels given must be the same on every rank"
    ck.run("pml wrapper labels given on one rank", lambda: mismatch(
        lambda r: dict(embeddings=x6, labels=labels[mine] if r == 0 else None,
                       indices_tuple=None if r == 0 else (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))),
        RuntimeError, given, given))
    ck.run("pml wrapper D mismatch", lambda: mismatch(
        lambda r: dict(embeddings=x6 if r == 0 else x6[:, :4], labels=labels[mine]), RuntimeError, "trailing shape",
        "trailing shape"))
    ck.run("pml wrapper local error published", lambda: mismatch(
        lambda r: dict(embeddings=x6, labels=labels[mine][:5] if r == 0 else labels[mine]), ValueError,
        "labels must be a 1-D tensor", "argument checks failed on rank(s) [0]"))
    ck.run("pml wrapper kind errors published", lambda: (
        mismatch(lambda r: dict(embeddings=x6, labels=labels[mine], enqueue_mask=(labels[mine] > 0) if r == 0 else None),
                 ValueError, "enqueue_mask is for a wrapped CrossBatchMemory", "argument checks failed on rank(s) [0]"),
        mismatch(lambda r: dict(embeddings=x6, labels=labels[mine], ref_emb=x6 if r == 0 else None,
                                ref_labels=labels[mine] if r == 0 else None),
                 ValueError, "not compatible with ref_emb", "argument checks failed on rank(s) [0]",
                 loss=lambda: fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), d, 40))))


class _TwoViews(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Dropout(0.2), torch.nn.Linear(12, 6))

    def forward(self, a, b):
        return self.f(a), self.f(b)


def trainer_checks(ck, rank, world, tmp):
    """fastcl.train.Trainer under DDP: the ranks draw their own augmentations, and a run resumed
    from a checkpoint continues as the uninterrupted run on every rank."""
    from fastcl.losses.ntxent import ntxent_loss
    from fastcl.train import Trainer, step_seed
    data = torch.randn(40, 10, generator=torch.Generator().manual_seed(3))  # 20 rows a rank: 4 steps an epoch
    path = os.path.join(tmp, "trainer_ck.pt")

    def train(epochs, max_steps=None, resume=None, checkpoint=None):
        torch.manual_seed(0)
        model = _TwoViews()
        draws = []

        def views(batch, gen):
            (x,) = batch
            noise = torch.randn(x.shape, generator=gen)
            draws.append(noise[0, :3].clone())
            return x + 0.1 * noise, x - 0.1 * noise
        trainer = Trainer(model, lambda a, b: ntxent_loss(a, b, 0.5, backend="reference"),
                          torch.optim.SGD(model.parameters(), lr=0.05), batch_size=5, seed=4, transform=views,
                          progress=False, checkpoint_path=checkpoint)
        hist = trainer.fit(data, epochs, max_steps=max_steps, resume=resume)
        return model, [r["loss"] for r in hist], draws

    full_model, full_losses, full_draws = train(2)

    def ranks_draw_apart():
        assert len(full_draws) == 8
        for k, d in enumerate(full_draws):
            want = torch.randn(5, 10, generator=torch.Generator().manual_seed(step_seed(4, rank, k)))[0, :3]
            assert torch.equal(d, want), f"step {k}"
        every = [None] * world
        dist.all_gather_object(every, torch.stack(full_draws))
        for r in range(1, world):
            assert not torch.equal(every[r], every[0]), f"ranks 0 and {r} drew the same augmentations"
    ck.run("trainer ranks draw apart", ranks_draw_apart)

    def resume_continues():
        train(2, max_steps=3, checkpoint=path)
        dist.barrier()  # rank 0 has written the checkpoint
        model, losses, draws = train(2, resume=path)
        assert losses == full_losses[3:], (losses, full_losses)
        assert all(torch.equal(a, b) for a, b in zip(draws, full_draws[3:]))
        for (name, a), (_, b) in zip(model.state_dict().items(), full_model.state_dict().items()):
            assert torch.equal(a, b), name
    ck.run("trainer resume under DDP", resume_continues)

    def ranks_disagree():
        """Ranks whose fit() would take different step counts all raise, before the first step
        (they would wait in DDP's all-reduce forever); a rank's own error reaches the others."""
        torch.manual_seed(0)
        model = _TwoViews()
        trainer = Trainer(model, lambda a, b: ntxent_loss(a, b, 0.5, backend="reference"),
                          torch.optim.SGD(model.parameters(), lr=0.05), batch_size=5, seed=4, progress=False)
        def raises(call, exc, *words):  # ``call()`` raises ``exc`` (no other kind) holding every word
            try:
                call()
            except exc as e:
                assert all(w in str(e) for w in words), repr(e)
            else:
                raise AssertionError("no error")
        raises(lambda: trainer.fit(data if rank == 0 else data[:30], 1), ValueError,
               "same rows of data on every rank", "[40, 30]")
        raises(lambda: trainer.fit(data, 0 if rank == 1 else 1), *((ValueError, "epochs must be an int >= 1")
                                                                   if rank == 1 else
                                                                   (RuntimeError, "failed on rank(s) [1]")))
        # The same size, other rows: each rank's own shard, which the trainer would split again.
        raises(lambda: trainer.fit(data if rank == 0 else data + 1, 1), ValueError, "same data on every rank",
               "not its shard")
        assert trainer.global_step == 0
    ck.run("trainer ranks disagree", ranks_disagree)


def worker(rank, world, tmp, case="checks"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    ck = Checker(rank)
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        if case == "checks":
            checks(ck, rank, world, tmp)
        elif case == "mismatched calls":
            mismatched_call_checks(ck, rank, world)
        elif case == "trainer":
            trainer_checks(ck, rank, world, tmp)
        else:
            raise ValueError(f"unknown case {case!r}")
    except Exception:
        ck.failures.append("worker: " + traceback.format_exc())
    # The results go out before the group is torn down: gloo's teardown can deadlock inside
    # PyTorch (its destructor joins a worker thread, holding the GIL, while that thread waits for
    # the GIL to free its last work), and the parent then knows the checks themselves finished.
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"passed": ck.passed, "failures": ck.failures}, f)
    sys.stdout.flush()
    if dist.is_initialized():
        time.sleep(0.2)  # releases the GIL, so gloo's worker frees its last work first
        dist.destroy_process_group()
