"""CLIP loss forward+backward on one GPU: fastcl (triton) vs naive open_clip-style PyTorch, Inf-CL
and the three-matmul floor, measured in one run with ``triton.testing.do_bench`` medians.

Peak memory is ``torch.cuda.max_memory_allocated`` during one fwd+bwd, minus the inputs and the
input gradients it returns.  Writes JSON and prints a table.

    python3 benchmarks/gpu_bench.py --json OUT/clip_bench.json
"""
import argparse
import json
import os
import subprocess
import time

import torch
import torch.nn.functional as F

from fastcl.baselines import naive_clip


def fastcl_clip(img, txt, scale):
    import fastcl
    return fastcl.clip_loss(img, txt, scale, backend="triton")


def infcl_clip(img, txt, scale):
    from inf_cl import cal_flash_loss  # upcasts to fp32 internally, one call per direction
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (cal_flash_loss(img, txt, labels, scale).mean() + cal_flash_loss(txt, img, labels, scale).mean())


def floor_three_mm(img, txt, scale):
    """Three matmuls of the loss's shape: S = I T^T, then dS @ T and dS^T @ I (S stands in for dS)."""
    s = img @ txt.T
    s @ txt
    s.T @ img
    return None


METHODS = {"fastcl": fastcl_clip, "naive": naive_clip, "infcl": infcl_clip, "floor_3mm": floor_three_mm}


def measure(method, n, d, dtype, rep_ms, bwd_mode=None):
    from triton.testing import do_bench

    if bwd_mode:
        os.environ["FASTCL_TRITON_BWD"] = bwd_mode
    else:
        os.environ.pop("FASTCL_TRITON_BWD", None)
    fn = METHODS[method]
    gen = torch.Generator(device="cuda").manual_seed(0)
    img = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    wrt = [img, txt, scale]

    def step():
        loss = fn(img, txt, scale)
        if loss is None:
            return None
        return loss, torch.autograd.grad(loss, wrt)

    row = {"method": method + (f"[{bwd_mode}]" if bwd_mode else ""), "n": n, "d": d, "dtype": str(dtype)}
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        grads_bytes = 0 if out is None else sum(g.numel() * g.element_size() for g in out[1])
        row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base - grads_bytes) / 2**20
        row["loss"] = None if out is None else float(out[0])
        del out
        row["median_ms"] = do_bench(step, warmup=max(25, rep_ms // 10), rep=rep_ms, return_mode="median")
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as exc:  # a failing row is reported, not fatal for the suite
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        torch.cuda.empty_cache()
    return row


def breakdown(n, d, dtype, rep_ms):
    """Where the fused time goes: forward kernel, each backward mode, and their GEMM pieces."""
    from triton.testing import do_bench

    from fastcl.kernels import similarity_lse as K

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=-1).to(dtype)
    scale, bias = torch.tensor(14.3, device="cuda"), torch.tensor(0.0, device="cuda")
    row, col = K.lse_forward(q, k, scale, bias, True, True, None)
    g = torch.full_like(row, 1.0 / n)
    parts = {
        "fwd rows+cols": lambda: K.lse_forward(q, k, scale, bias, True, True, None),
        "fwd rows only": lambda: K.lse_forward(q, k, scale, bias, True, False, None),
        "bwd strip": lambda: K.lse_backward(q, k, scale, bias, row, col, g, g, None, mode="strip"),
        "mm q@k.T": lambda: q @ k.T,
    }
    if d <= K.FUSED_MAX_D:
        parts["bwd fused"] = lambda: K.lse_backward(q, k, scale, bias, row, col, g, g, None, mode="fused")
    out = []
    for name, fn in parts.items():
        try:
            out.append({"part": name, "n": n, "d": d, "median_ms": do_bench(fn, rep=rep_ms, return_mode="median")})
        except Exception as exc:
            out.append({"part": name, "n": n, "d": d, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="8192,32768,131072")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--methods", default="fastcl,floor_3mm,naive,infcl")
    ap.add_argument("--rep-ms", type=int, default=400)
    ap.add_argument("--mode-check", default="32768:256", help="N:D at which both backward modes are timed")
    ap.add_argument("--breakdown", default="32768:768,32768:256", help="N:D list for the per-kernel timing")
    ap.add_argument("--skip", default="", help="comma list of METHOD@N rows to leave out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16
    rows = []

    def emit(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": _commit(), "dtype": "bfloat16", "d": args.d}
    for n in [int(x) for x in args.ns.split(",")]:
        for m in args.methods.split(","):
            if f"{m}@{n}" in args.skip.split(","):
                continue
            emit(measure(m, n, args.d, dtype, args.rep_ms))
    if args.mode_check:
        n, d = (int(x) for x in args.mode_check.split(":"))
        for mode in ("fused", "strip"):
            emit(measure("fastcl", n, d, dtype, args.rep_ms, bwd_mode=mode))
        emit(measure("floor_3mm", n, d, dtype, args.rep_ms))
    parts = []
    for nd in filter(None, args.breakdown.split(",")):
        n, d = (int(x) for x in nd.split(":"))
        parts += breakdown(n, d, dtype, args.rep_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "breakdown": parts}, f, indent=2)
    print_table(rows)
    print("\nbreakdown (ms):", ", ".join(f"{p['part']}@{p['n']}x{p['d']}={p.get('median_ms', float('nan')):.2f}"
                                      for p in parts))


def print_table(rows):
    print(f"\n{'method':<16} {'N':>7} {'D':>5} {'median ms':>10} {'x floor':>8} {'vs naive':>9} {'vs infcl':>9} {'peak extra MB':>14}")
    by = {(r["method"], r["n"], r["d"]): r for r in rows}
    for r in rows:
        t = r.get("median_ms")
        fl, nv, ic = (by.get((name, r["n"], r["d"]), {}).get("median_ms") for name in ("floor_3mm", "naive", "infcl"))
        ts = "OOM" if r.get("oom") else ("ERR" if r.get("error") else f"{t:.2f}")
        f = lambda ref, inv=False: (f"{(t / ref if not inv else ref / t):.2f}x" if (t and ref) else "-")  # noqa: E731
        mem = r.get("peak_extra_mb")
        print(f"{r['method']:<16} {r['n']:>7} {r['d']:>5} {ts:>10} {f(fl):>8} {f(nv, True):>9} {f(ic, True):>9} "
              f"{'-' if mem is None else f'{mem:.1f}':>14}")


def _commit():
    if os.environ.get("FASTCL_COMMIT"):
        return os.environ["FASTCL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
