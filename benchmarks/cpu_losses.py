"""A loss's forward+backward on the CPU: the fused ``cpu`` backend vs the naive PyTorch path
users have today (``fastcl.baselines``: open_clip ClipLoss / SigLipLoss, SupContrast SupConLoss).

Each step of each method runs in its own process, so peak resident memory is measured cleanly as
(peak RSS during the first timed step) - (RSS once the inputs exist).  The floor row is four
matmuls of the same shape: what any method that recomputes the logits in the backward pays.

    python benchmarks/cpu_losses.py --loss clip --n 16384 --d 256 --reps 5 --json OUT.json
    python benchmarks/cpu_losses.py --loss siglip --n 8192 --d 256
    python benchmarks/cpu_losses.py --loss supcon --n 8192 --d 256     # n_views=2, 100 classes
    python benchmarks/cpu_losses.py --loss pml_ntxent --n 1024 --d 128  # PML's NTXentLoss is "naive"

    python benchmarks/cpu_losses.py --loss caption --n 32 --d 49408 --methods naive,fastcl_cpu
    python benchmarks/cpu_losses.py --loss hypersphere --n 8192 --d 128  # lightly's pdist form is naive
    python benchmarks/cpu_losses.py --loss pml_triplet --n 1024 --d 128  # PML's TripletMarginLoss, 100 classes
    python benchmarks/cpu_losses.py --loss pml_contrastive --n 8192 --d 128  # PML's ContrastiveLoss, 100 classes
    python benchmarks/cpu_losses.py --loss pml_multisim --n 8192 --d 128     # PML's MultiSimilarityLoss
    python benchmarks/cpu_losses.py --loss pml_xbm --n 1024 --d 128 --methods naive,fastcl_cpu
        # PML's CrossBatchMemory(ContrastiveLoss(), d, 16384), full, one batch of n (100 classes)

caption is CoCa's caption cross-entropy over (N, 76, D) logits (D the vocabulary), 10% padding.
pml_ntxent takes SimCLR's labels (row i and row i + N/2 are one pair, as PML's SelfSupervisedLoss
builds them) and needs pytorch-metric-learning (``pip install .[peers]``).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

METHODS = ("naive", "fastcl_cpu", "floor_4mm")
# Extra method: the fused backend with ATen's GEMM instead of oneDNN's (csrc/tile_gemm.h).
OPTIONAL_METHODS = ("fastcl_cpu_aten_gemm",)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _inputs(loss: str, n: int, d: int):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if loss == "caption":
        logits = torch.randn(n, 76, d).requires_grad_()
        labels = torch.randint(1, d, (n, 76))
        labels[:, -8:] = 0
        return [logits], {"labels": labels}, n
    if loss in ("pml_triplet", "pml_contrastive", "pml_multisim", "pml_xbm"):
        emb = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
        return [emb], {"labels": torch.randint(0, 100, (n,))}, n
    if loss == "pml_ntxent":
        emb = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
        return [emb], {"labels": torch.arange(n) % (n // 2)}, n
    if loss == "supcon":
        feats = F.normalize(torch.randn(n, 2, d), dim=-1).requires_grad_()
        return [feats], {"labels": torch.randint(0, 100, (n,))}, 2 * n
    img = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    if loss == "siglip":
        return [img, txt], {"scale": torch.tensor(10.0, requires_grad=True),
                            "bias": torch.tensor(-10.0, requires_grad=True)}, n
    return [img, txt], {"scale": torch.tensor(14.3, requires_grad=True)}, n


def _loss_fns(loss: str):
    """(naive, fused) callables taking (tensors, extra)."""
    import torch.nn.functional as F

    import fastcl
    from fastcl import baselines as B

    if loss == "clip":
        return (lambda t, e: B.naive_clip(t[0], t[1], e["scale"]),
                lambda t, e: fastcl.clip_loss(t[0], t[1], e["scale"], backend="cpu"))
    if loss == "hypersphere":
        return (lambda t, e: B.naive_hypersphere(t[0], t[1]),
                lambda t, e: fastcl.hypersphere_loss(t[0], t[1], backend="cpu"))
    if loss == "caption":  # open_clip CoCaLoss's caption term
        return (lambda t, e: F.cross_entropy(t[0].permute(0, 2, 1), e["labels"], ignore_index=0),
                lambda t, e: fastcl.caption_loss(t[0], e["labels"], pad_id=0))
    if loss == "pml_triplet":
        from pytorch_metric_learning.losses import TripletMarginLoss
        return (lambda t, e: TripletMarginLoss(0.05)(t[0], e["labels"]),
                lambda t, e: fastcl.triplet_margin_loss_pml(t[0], e["labels"], 0.05))
    if loss == "pml_contrastive":
        from pytorch_metric_learning.losses import ContrastiveLoss
        return (lambda t, e: ContrastiveLoss()(t[0], e["labels"]),
                lambda t, e: fastcl.contrastive_loss_pml(t[0], e["labels"]))
    if loss == "pml_multisim":
        from pytorch_metric_learning.losses import MultiSimilarityLoss
        return (lambda t, e: MultiSimilarityLoss()(t[0], e["labels"]),
                lambda t, e: fastcl.multi_similarity_loss_pml(t[0], e["labels"]))
    if loss == "pml_xbm":
        import pytorch_metric_learning.losses as pml_losses

        import fastcl.nn.pml as ours
        return (_full_memory(pml_losses.CrossBatchMemory, pml_losses.ContrastiveLoss),
                _full_memory(ours.CrossBatchMemory, ours.ContrastiveLoss))
    if loss == "pml_ntxent":
        from pytorch_metric_learning.losses import NTXentLoss
        return (lambda t, e: NTXentLoss(0.07)(t[0], e["labels"]),
                lambda t, e: fastcl.ntxent_loss_pml(t[0], e["labels"], 0.07))
    if loss == "siglip":
        return (lambda t, e: B.naive_siglip(t[0], t[1], e["scale"], e["bias"]),
                lambda t, e: fastcl.siglip_loss(t[0], t[1], e["scale"], e["bias"], backend="cpu"))
    return (lambda t, e: B.naive_supcon(t[0], e["labels"], temperature=0.1, base_temperature=0.1),
            lambda t, e: fastcl.supcon_loss(t[0], e["labels"], temperature=0.1, base_temperature=0.1,
                                            backend="cpu"))


def _full_memory(memory_cls, loss_cls, size: int = 16384):
    """A step of ``memory_cls(loss_cls(), d, size)`` whose memory is already full (written
    directly, on the first call: the untimed warm-up), on (embeddings, labels)."""
    import torch
    import torch.nn.functional as F

    state = {}

    def step(t, e):
        if "xbm" not in state:
            d = t[0].shape[1]
            xbm = memory_cls(loss_cls(), d, size)
            g = torch.Generator().manual_seed(1)
            xbm.embedding_memory = F.normalize(torch.randn(size, d, generator=g), dim=-1)
            xbm.label_memory = torch.randint(0, 100, (size,), generator=g)
            xbm.has_been_filled, xbm.queue_idx = True, 0
            state["xbm"] = xbm
        return state["xbm"](t[0], e["labels"])
    return step


def worker(loss: str, method: str, n: int, d: int, reps: int) -> dict:
    import torch

    tensors, extra, rows = _inputs(loss, n, d)
    naive, fused = _loss_fns(loss)
    params = tensors + [v for v in extra.values() if v.requires_grad]
    out = torch.empty(rows, rows) if method == "floor_4mm" else None

    def floor(t, e):
        # Four matmuls of the logits' shape, into one preallocated buffer (no page faults).
        z = t[0].detach().reshape(-1, d)
        k = z if len(t) == 1 else t[1].detach()
        for _ in range(4):
            torch.mm(z, k.T, out=out) if z.shape[0] == rows else torch.mm(z, k.T)

    fn = {"naive": naive, "fastcl_cpu": fused, "fastcl_cpu_aten_gemm": fused, "floor_4mm": floor}[method]

    def step(t, e):
        loss_value = fn(t, e)
        if loss_value is not None:
            loss_value.backward()
        return loss_value

    # Warm up on a tiny batch so lazy imports and first-call set-up stay out of time and memory.
    small = [x[:8].detach().requires_grad_() for x in tensors]
    step(small, {k: (v[:8] if k == "labels" else v) for k, v in extra.items()})
    base = _rss_kb()
    times, value, peak = [], None, None
    for _ in range(reps):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        res = step(tensors, extra)
        times.append(time.perf_counter() - t0)
        value = None if res is None else float(res.detach())
        # Peak of the first step: later steps only add allocator fragmentation to the high-water mark.
        peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "times_s": times, "median_s": sorted(times)[len(times) // 2],
            "peak_extra_mb": max(0, peak - base) / 1024, "loss": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", default="clip",
                    choices=("clip", "siglip", "supcon", "pml_ntxent", "pml_triplet", "pml_contrastive",
                             "pml_multisim", "pml_xbm", "caption", "hypersphere"))
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="rounds; each runs every method once, in its own process")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {METHODS + OPTIONAL_METHODS}")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.loss, args.worker, args.n, args.d, args.reps)))
        return
    # Rounds interleave the methods (one process per method per round), so that drift in the
    # machine's speed over the run hits every method alike.
    per = {m: [] for m in args.methods.split(",")}
    for _ in range(args.reps):
        for m in per:
            env = dict(os.environ, FASTCL_CPU_GEMM="aten") if m == "fastcl_cpu_aten_gemm" else None
            out = subprocess.run([sys.executable, __file__, "--loss", args.loss, "--worker", m, "--n", str(args.n),
                                  "--d", str(args.d), "--reps", "1"], capture_output=True, text=True, check=True,
                                 env=env)
            per[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for m, runs in per.items():
        times = [r["times_s"][0] for r in runs]
        rows.append({"method": m, "times_s": times, "median_s": sorted(times)[len(times) // 2],
                     "peak_extra_mb": max(r["peak_extra_mb"] for r in runs), "loss": runs[0]["loss"]})
    by = {r["method"]: r for r in rows}
    print(f"{args.loss} loss fwd+bwd, fp32, N={args.n}, D={args.d}, median of {args.reps} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'method':<12} {'median s':>9} {'peak extra MB':>14} {'vs naive':>9} {'x floor':>8}  loss")
    for r in rows:
        vs = by["naive"]["median_s"] / r["median_s"] if "naive" in by else float("nan")
        fl = r["median_s"] / by["floor_4mm"]["median_s"] if "floor_4mm" in by else float("nan")
        loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
        print(f"{r['method']:<12} {r['median_s']:>9.3f} {r['peak_extra_mb']:>14.1f} {vs:>8.2f}x {fl:>8.2f}  {loss}")
    if "naive" in by and "fastcl_cpu" in by:
        print(f"fastcl peak memory = {100 * by['fastcl_cpu']['peak_extra_mb'] / by['naive']['peak_extra_mb']:.2f}% of naive")
    if args.json:
        import torch
        from fastcl import _ext
        from fastcl.profiling import source_commit
        meta = {"cpu_gemm": _ext._C.cpu_gemm() if _ext.extension_available() else None, "loss": args.loss, "n": args.n, "d": args.d, "reps": args.reps, "torch": torch.__version__, "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"), "commit": source_commit()}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
