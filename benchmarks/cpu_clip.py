"""CLIP loss forward+backward on the CPU: fused ``cpu`` backend vs open_clip-style naive PyTorch.

Each step of each method runs in its own process, so peak resident memory is measured cleanly as
(peak RSS during the first timed step) - (RSS once the inputs exist).  The floor row is four
matmuls of the same shape: what any method that recomputes the logits in the backward pays.

    python benchmarks/cpu_clip.py --n 16384 --d 256 --reps 3 --json benchmarks/results/cpu_clip.json
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


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(method: str, n: int, d: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    img = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)

    def naive():
        from fastcl.baselines import naive_clip
        loss = naive_clip(img, txt, scale)
        loss.backward()
        return loss

    def fused():
        import fastcl
        loss = fastcl.clip_loss(img, txt, scale, backend="cpu")
        loss.backward()
        return loss

    out = torch.empty(n, n) if method == "floor_4mm" else None

    def floor():
        # Into one preallocated (N, N) buffer, so page faults of fresh 1 GB outputs stay out.
        a, b = img.detach(), txt.detach()
        for _ in range(4):
            torch.mm(a, b.T, out=out) if a.shape[0] == n else torch.mm(a, b.T)

    fn = {"naive": naive, "fastcl_cpu": fused, "floor_4mm": floor}[method]
    # Warm up on a tiny batch so lazy imports and first-call set-up stay out of time and memory.
    full = (img, txt)
    img, txt = img[:8].detach().requires_grad_(), txt[:8].detach().requires_grad_()
    fn()
    img, txt = full
    base = _rss_kb()
    times, loss, peak = [], None, None
    for _ in range(reps):
        img.grad = txt.grad = scale.grad = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        loss = None if out is None else float(out.detach())
        # Peak of the first step: later steps only add allocator fragmentation to the high-water mark.
        peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "times_s": times, "median_s": sorted(times)[len(times) // 2],
            "peak_extra_mb": max(0, peak - base) / 1024, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="rounds; each runs every method once, in its own process")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.d, args.reps)))
        return
    # Rounds interleave the methods (one process per method per round), so that drift in the
    # machine's speed over the run hits every method alike.
    per = {m: [] for m in args.methods.split(",")}
    for _ in range(args.reps):
        for m in per:
            out = subprocess.run([sys.executable, __file__, "--worker", m, "--n", str(args.n), "--d", str(args.d),
                                  "--reps", "1"], capture_output=True, text=True, check=True)
            per[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for m, runs in per.items():
        times = [r["times_s"][0] for r in runs]
        rows.append({"method": m, "times_s": times, "median_s": sorted(times)[len(times) // 2],
                     "peak_extra_mb": max(r["peak_extra_mb"] for r in runs), "loss": runs[0]["loss"]})
    by = {r["method"]: r for r in rows}
    print(f"CLIP loss fwd+bwd, fp32, N=M={args.n}, D={args.d}, median of {args.reps} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
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
        meta = {"n": args.n, "d": args.d, "reps": args.reps, "torch": torch.__version__, "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
