"""CLIP loss forward+backward on one GPU: fastcl (triton and cuda backends) vs naive open_clip-style
PyTorch, Inf-CL and the three-matmul floor, measured in one run with ``triton.testing.do_bench``
medians.

Peak memory is ``torch.cuda.max_memory_allocated`` during one fwd+bwd (after a first, unmeasured
one), minus the inputs and the input gradients it returns.  Writes JSON and prints a table.

    python3 benchmarks/gpu_bench.py --json OUT/clip_bench.json

Second mode: time triton against cuda (forward + backward of similarity_lse with rows and
columns, and of sigmoid_pair_loss) over a small grid of N = M and D, and write the table that
``auto`` consults (fastcl/ops/dispatch_table.py), with this GPU's name in it:

    python3 benchmarks/gpu_bench.py --dispatch-table OUT/dispatch_table.py
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from fastcl.baselines import naive_clip
from fastcl.profiling import host_profile, kernel_profile, source_commit


def fastcl_clip(img, txt, scale):
    import fastcl
    return fastcl.clip_loss(img, txt, scale, backend="triton")


def fastcl_cuda_clip(img, txt, scale):
    import fastcl
    return fastcl.clip_loss(img, txt, scale, backend="cuda")


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


METHODS = {"fastcl": fastcl_clip, "fastcl_cuda": fastcl_cuda_clip, "naive": naive_clip, "infcl": infcl_clip,
           "floor_3mm": floor_three_mm}


def _set_env(name, value):
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)


def _unit_pair(n, d, dtype, device="cuda", requires_grad=False):
    """Two (n, d) unit-norm tensors of ``dtype``, the same ones for every row (seed 0)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype)
                 .requires_grad_(requires_grad) for _ in range(2))


def _lse_setup(n, d, dtype, device="cuda"):
    """Inputs, forward statistics and the three timed LSE calls that ``breakdown`` and
    ``config_sweep`` share: (q, k, scale, bias, grad_args, parts), with ``grad_args`` the
    arguments of a backward call (``lse_grads(*grad_args)`` of either GPU backend) and ``parts``
    {"fwd rows+cols", "fwd rows only", "bwd strip"} -> call."""
    from fastcl.kernels import similarity_lse as K

    q, k = _unit_pair(n, d, dtype, device)
    scale, bias, one = (torch.tensor(v, device=device) for v in (14.3, 0.0, 1.0))
    row, col = K.lse_forward(q, k, scale, bias, True, True, None)
    g = torch.full_like(row, 1.0 / n)
    grad_args = (q, k, scale, bias, row, col, g, g, None, None, None, one, q.dtype)
    parts = {"fwd rows+cols": lambda: K.lse_forward(q, k, scale, bias, True, True, None),
             "fwd rows only": lambda: K.lse_forward(q, k, scale, bias, True, False, None),
             "bwd strip": lambda: K.lse_grads(*grad_args, mode="strip")}
    return q, k, scale, bias, grad_args, parts


def measure(method, n, d, dtype, rep_ms, bwd_mode=None, exp_mode=None):
    from triton.testing import do_bench

    _set_env("FASTCL_TRITON_BWD", bwd_mode)
    _set_env("FASTCL_TRITON_EXP", exp_mode)
    step = _clip_step(method, n, d, dtype)
    tags = [t for t in (bwd_mode, exp_mode and f"exp={exp_mode}") if t]
    row = {"method": method + (f"[{','.join(tags)}]" if tags else ""), "n": n, "d": d, "dtype": str(dtype)}
    try:
        # One call first: kernel compilation, autotuning and cuBLAS's workspace (made once per
        # process) would otherwise count against whichever row runs first.
        step()
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


def breakdown(n, d, dtype, rep_ms, tuning_rows=False):
    """Where the fused time goes: forward kernel, each backward mode, and their GEMM pieces."""
    from triton.testing import do_bench

    from fastcl.kernels import similarity_lse as K

    q, k, scale, bias, grad_args, core = _lse_setup(n, d, dtype)

    def bwd(mode):
        return lambda: K.lse_grads(*grad_args, mode=mode)

    def with_env(name, value, fn):
        def run():
            os.environ[name] = value
            try:
                return fn()
            finally:
                os.environ.pop(name, None)
        return run

    def shared(fn):
        return with_env("FASTCL_TRITON_EXP", "shared", fn)

    def tuned(fn):
        return with_env("FASTCL_TRITON_AUTOTUNE", "1", fn)

    def big_workspace(fn):  # one column chunk: no repeated rounding of dq, more memory
        def run():
            from fastcl.ops import strips
            old, strips.WORKSPACE_MB = strips.WORKSPACE_MB, 1024.0
            try:
                return fn()
            finally:
                strips.WORKSPACE_MB = old
        return run

    parts = {**core, "bwd strip, 1 GB workspace": big_workspace(bwd("strip")), "mm q@k.T": lambda: q @ k.T}
    if tuning_rows:  # the opt-in kernel variants (FASTCL_TRITON_EXP, FASTCL_TRITON_AUTOTUNE)
        parts["fwd rows+cols, shared exp"] = shared(lambda: K.lse_forward(q, k, scale, bias, True, True, None))
        parts["bwd strip, shared exp"] = shared(bwd("strip"))
        parts["fwd rows+cols, autotuned"] = tuned(lambda: K.lse_forward(q, k, scale, bias, True, True, None))
        parts["bwd strip, autotuned"] = tuned(bwd("strip"))
    if d <= K.FUSED_MAX_D:
        parts["bwd fused"] = bwd("fused")
    from fastcl._ext import extension_has_cuda
    if extension_has_cuda():
        from fastcl.ops import strips
        parts["cuda fwd rows+cols"] = lambda: strips.lse_forward(q, k, scale, bias, True, True, None)
        parts["cuda bwd"] = lambda: strips.lse_grads(*grad_args)
        ws = torch.empty((strips.strip_rows(n, n), n), device="cuda")
        parts["cuda strip mm (fp32 out), all strips"] = lambda: [
            strips.mm_f32_into(ws[:min(ws.shape[0], n - r0)], q[r0:r0 + ws.shape[0]], k.T, False)
            for r0 in range(0, n, ws.shape[0])]
    out = []
    for name, fn in parts.items():
        try:
            out.append({"part": name, "n": n, "d": d, "median_ms": do_bench(fn, rep=rep_ms, return_mode="median")})
        except Exception as exc:
            out.append({"part": name, "n": n, "d": d, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(json.dumps(out[-1]), flush=True)
    # The launch shapes the opt-in autotuner chose (candidates: K.TUNE_SHAPES).
    for (kernel, interp), tuner in K._TUNED.items():
        best = getattr(tuner, "best_config", None)
        if not interp and best is not None:
            out.append({"part": f"autotune best {kernel}", "n": n, "d": d, "config": str(best)})
            print(json.dumps(out[-1]), flush=True)
    return out


# Launch shapes the default run times: the fixed shapes, and three whose forward fits two or more
# programs per SM on sm_90 (benchmarks/triton_sm90_resources.py --sweep; the dS kernel at
# 128,128,32 still fits one; 64,128,32,4,4 fits four of each), so one can overlap another's
# epilogue.  The tuning step times every shape of the autotuner's list.
QUICK_SHAPES = ((128, 128, 64, 8, 3), (128, 128, 32, 8, 3, 128), (64, 128, 64, 4, 3), (64, 128, 32, 4, 4),
                (64, 64, 64, 4, 3))


def config_sweep(n, d, dtype, rep_ms, device="cuda", shapes=None, exp_modes=("exact",)):
    """The LSE kernels at each launch shape of the autotuner's list (``FASTCL_TRITON_TILE``): forward
    rows+cols, forward rows only, and the strip backward (its cuBLAS part is the same at every
    shape, so its differences are the dS kernel's), at each of ``shapes`` (default: the autotuner's
    list) and each of ``exp_modes`` (``FASTCL_TRITON_EXP``: the shared exp changes the epilogue's
    work, so the best shape may differ).  Rows: {"tile", "exp", "part", "n", "d", "median_ms"}.
    ``device`` is "cuda" except in the CPU smoke test (interpreter, which keeps its own tiles)."""
    from triton.testing import do_bench

    from fastcl.kernels import similarity_lse as K

    if K.autotune_enabled():  # the autotuner would pick the shapes itself
        print("config sweep skipped: FASTCL_TRITON_AUTOTUNE=1", flush=True)
        return []
    parts = _lse_setup(n, d, dtype, device)[-1]
    out = []
    user_tile, user_exp = os.environ.get("FASTCL_TRITON_TILE"), os.environ.get("FASTCL_TRITON_EXP")
    for exp in exp_modes:
        for shape in K.TUNE_SHAPES if shapes is None else shapes:
            tile = ",".join(map(str, shape))
            os.environ["FASTCL_TRITON_TILE"], os.environ["FASTCL_TRITON_EXP"] = tile, exp
            try:
                for name, fn in parts.items():
                    r = {"tile": tile, "exp": exp, "part": name, "n": n, "d": d}
                    try:
                        r["median_ms"] = do_bench(fn, rep=rep_ms, return_mode="median")
                    except Exception as exc:  # a shape that fails to compile or run loses its row
                        r["error"] = f"{type(exc).__name__}: {exc}"[:200]
                    out.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                _set_env("FASTCL_TRITON_TILE", user_tile)
                _set_env("FASTCL_TRITON_EXP", user_exp)
    return out


def _clip_step(method, n, d, dtype):
    """A CLIP fwd+bwd of ``method`` on fresh unit-norm (n, d) inputs; returns (loss, grads) or None."""
    fn = METHODS[method]
    img, txt = _unit_pair(n, d, dtype, requires_grad=True)
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)

    def step():
        loss = fn(img, txt, scale)
        return None if loss is None else (loss, torch.autograd.grad(loss, [img, txt, scale]))
    return step


def profile_rows(methods, n, d, dtype, host=False):
    """The CLIP fwd+bwd of each method at (n, d) profiled, as JSON-ready rows: kernel by kernel
    (``kernel_profile``, key "profile"), or with ``host`` the time the host takes to issue a step
    against its wall time and the functions that take it (``host_profile``, key "host")."""
    key, profiler = ("host", host_profile) if host else ("profile", kernel_profile)
    out = []
    for method in methods:
        try:
            out.append({key: method, "n": n, "d": d, **profiler(_clip_step(method, n, d, dtype))})
        except Exception as exc:  # a failing profile is reported, not fatal for the suite
            out.append({key: method, "n": n, "d": d, "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            torch.cuda.empty_cache()
        print(json.dumps(out[-1]), flush=True)
    return out


def exp_list(text: str):
    """argparse type of --sweep-exp: "exact,shared" -> ("exact", "shared"); each a FASTCL_TRITON_EXP mode."""
    modes = tuple(m for m in text.split(",") if m)
    bad = [m for m in modes if m not in ("exact", "shared")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--sweep-exp takes exact and/or shared, got {text!r}")
    return modes


def nd_list(text: str):
    """argparse type of the N:D options: "32768:768,8192:256" -> [(32768, 768), (8192, 256)]; "" -> []."""
    out = []
    for item in filter(None, text.split(",")):
        try:
            n, d = (int(x) for x in item.split(":"))
        except ValueError:
            n = d = 0
        if n <= 0 or d <= 0:
            raise argparse.ArgumentTypeError(f"expected a comma list of N:D with positive integers, got {text!r}")
        out.append((n, d))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="8192,32768,131072")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--methods", default="fastcl,fastcl_cuda,floor_3mm,naive,infcl")
    ap.add_argument("--rep-ms", type=int, default=400)
    ap.add_argument("--mode-check", default="32768:256", type=nd_list,
                    help="N:D at which both backward modes are timed")
    ap.add_argument("--tuning-rows", action="store_true",
                    help="add breakdown rows for FASTCL_TRITON_EXP=shared and FASTCL_TRITON_AUTOTUNE=1")
    ap.add_argument("--exp-check", default="", type=nd_list,
                    help="N:D at which both Triton exp modes (FASTCL_TRITON_EXP exact, shared) are timed")
    ap.add_argument("--breakdown", default="32768:768,32768:256", type=nd_list, help="N:D list for the per-kernel timing")
    ap.add_argument("--skip", default="", help="comma list of METHOD@N rows to leave out")
    ap.add_argument("--config-sweep", default="32768:768", type=nd_list,
                    help="N:D at which the LSE kernels are timed at several launch shapes")
    ap.add_argument("--sweep-shapes", choices=("quick", "all"), default="quick",
                    help="quick: QUICK_SHAPES; all: every shape of the autotuner's list")
    ap.add_argument("--sweep-exp", default="exact", type=exp_list,
                    help="comma list of FASTCL_TRITON_EXP modes (exact, shared) the sweep times each shape in")
    ap.add_argument("--profile", default="32768:768", type=nd_list,
                    help="N:D list at which the fastcl rows are profiled kernel by kernel (torch.profiler)")
    ap.add_argument("--host-profile", default="8192:768,32768:768", type=nd_list,
                    help="N:D list at which the fastcl rows' host time is measured and profiled (cProfile)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dispatch-table", default=None, metavar="PATH",
                    help="instead of the CLIP table: time triton vs cuda over the grid and write the dispatch table")
    ap.add_argument("--table-ns", default=None, help="N = M grid (default: dispatch_table.GRID_N)")
    ap.add_argument("--table-ds", default=None, help="D grid (default: dispatch_table.GRID_D)")
    ap.add_argument("--table-dtypes", default="bfloat16,float32")
    ap.add_argument("--table-margin", type=float, default=0.05,
                    help="cuda wins a point only when at least this fraction faster than triton")
    args = ap.parse_args()
    if args.dispatch_table:
        return dispatch_table_mode(args)
    dtype = torch.bfloat16
    rows, parts, sweep, profiles = [], [], [], []

    def save():  # after every row and stage: a later one that dies keeps what came before
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows, "breakdown": parts, "config_sweep": sweep,
                           "profiles": profiles}, f, indent=2)

    def emit(r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        save()

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": source_commit(), "dtype": "bfloat16", "d": args.d}
    for n in [int(x) for x in args.ns.split(",") if x]:
        for m in args.methods.split(","):
            if f"{m}@{n}" in args.skip.split(","):
                continue
            emit(measure(m, n, args.d, dtype, args.rep_ms))
    for n, d in args.mode_check:
        for mode in ("fused", "strip"):
            emit(measure("fastcl", n, d, dtype, args.rep_ms, bwd_mode=mode))
        emit(measure("floor_3mm", n, d, dtype, args.rep_ms))
    for n, d in args.exp_check:
        for mode in ("exact", "shared"):
            emit(measure("fastcl", n, d, dtype, args.rep_ms, exp_mode=mode))
        emit(measure("floor_3mm", n, d, dtype, args.rep_ms))
    _set_env("FASTCL_TRITON_EXP", None)

    def stage(name, fn, into):
        try:
            into += fn()
        except Exception as exc:  # a failing stage is reported, not fatal for the suite
            into.append({"stage": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(into[-1]), flush=True)
        save()

    for n, d in args.breakdown:
        stage("breakdown", lambda: breakdown(n, d, dtype, args.rep_ms, args.tuning_rows), parts)
    for n, d in args.config_sweep:
        shapes = QUICK_SHAPES if args.sweep_shapes == "quick" else None
        stage("config_sweep", lambda: config_sweep(n, d, dtype, args.rep_ms, shapes=shapes,
                                                                 exp_modes=args.sweep_exp), sweep)
    fastcl_methods = [m for m in args.methods.split(",") if m.startswith("fastcl")]
    for n, d in args.profile:
        stage("profile", lambda: profile_rows(fastcl_methods, n, d, dtype), profiles)
    for n, d in args.host_profile:
        stage("host_profile", lambda: profile_rows(fastcl_methods, n, d, dtype, host=True), profiles)
    save()
    print_table(rows)
    print("\nbreakdown (ms):", ", ".join(f"{p['part']}@{p['n']}x{p['d']}={p.get('median_ms', float('nan')):.2f}"
                                      for p in parts if "part" in p))
    for part in dict.fromkeys(r["part"] for r in sweep if "part" in r):
        timed = sorted((r["median_ms"], r["tile"] + ("" if r.get("exp", "exact") == "exact" else " shared"))
                       for r in sweep if r.get("part") == part and "median_ms" in r)
        print(f"sweep {part}: " + ", ".join(f"[{t}] {ms:.2f}" for ms, t in timed))
    for p in profiles:
        if "host_ms_per_step" in p:
            funcs = ", ".join(f"{r['function'][:48]} {r['own_ms_per_step']:.3f}" for r in p["top"][:6])
            print(f"host {p['host']}@{p['n']}x{p['d']}: issue {p['host_ms_per_step']:.2f} ms of "
                  f"{p['wall_ms_per_step']:.2f} ms wall; own time: {funcs}")
        elif "top" in p:
            kernels = ", ".join(f"{r['name'][:40]} {r['ms_per_step']:.2f}" for r in p["top"][:5])
            print(f"profile {p['profile']}@{p['n']}x{p['d']}: wall {p['wall_ms_per_step']:.2f} ms, "
                  f"GPU busy {p['busy_ms_per_step']:.2f} ms; top: {kernels}")


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


OPS = ("similarity_lse", "sigmoid_pair", "masking")
MASK_L = 196  # tokens per sample in the masking rows (ViT-B/16 at 224 px), mask ratio 0.75


def time_op(op, backend, n, d, dtype, rep_ms, device="cuda"):
    """Median ms of forward + backward of ``op`` on ``backend``; None if it fails.  The losses take
    q, k (n, d); "masking" is ``random_masking`` of (n // MASK_L, MASK_L, d) tokens.  ``device``
    is "cuda" except in the CPU smoke test."""
    from triton.testing import do_bench

    import fastcl
    if op == "masking":
        x = torch.randn(max(1, n // MASK_L), MASK_L, d, device=device, dtype=dtype, requires_grad=True)
        noise = torch.rand(x.shape[:2], device=device)
    else:
        q, k = _unit_pair(n, d, dtype, device=device, requires_grad=True)

    def step():
        if op == "masking":
            kept = fastcl.random_masking(x, 0.75, noise=noise, backend=backend)[0]
            return torch.autograd.grad(kept, [x], torch.ones_like(kept))
        if op == "similarity_lse":
            r, c = fastcl.ops.similarity_lse(q, k, 14.3, rows=True, cols=True, backend=backend)
            loss = r.sum() + c.sum()
        else:
            loss = fastcl.ops.sigmoid_pair_loss(q, k, 10.0, -10.0, backend=backend)
        return torch.autograd.grad(loss, [q, k])

    try:
        step()
        return do_bench(step, warmup=25, rep=rep_ms, return_mode="median")
    except Exception as exc:  # a backend that fails at a point loses it
        print(f"  {op} {backend} n={n} d={d} {dtype}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def render_dispatch_table(measured_on, grid_n, grid_d, table, timings):
    """Text of fastcl/ops/dispatch_table.py: ``table`` maps (op, dtype, n, d) to the backend,
    ``timings`` the same keys to (triton ms, cuda ms)."""
    lines = [
        '"""Which fused GPU backend ``auto`` picks for CUDA tensors, per op, dtype and shape.',
        "",
        f"Measured on {measured_on}:",
        "forward + backward of similarity_lse (rows and columns) and sigmoid_pair_loss at N = M, and of",
        f"random_masking on N // {MASK_L} samples of {MASK_L} tokens (key N: the tokens), median ms",
        "(triton / cuda) in the comment after each entry.  Regenerate on the GPU that should decide:",
        "",
        "    python benchmarks/gpu_bench.py --dispatch-table fastcl/ops/dispatch_table.py",
        "",
        "Lookup (``fastcl.ops.dispatch.pick_gpu_backend``): the grid point nearest in log2 of",
        "sqrt(N * M) and of D, among the entries for the op and dtype; DEFAULT where there is none.",
        '"""',
        "",
        f"MEASURED_ON = {measured_on!r}",
        'DEFAULT = "triton"',
        f"GRID_N = {tuple(grid_n)!r}",
        f"GRID_D = {tuple(grid_d)!r}",
        "",
        '# (op, dtype name, N, D) -> "triton" or "cuda"; N = M at every measured point.',
        "TABLE = {",
    ]
    fmt = lambda t: "failed" if t is None else f"{t:.3f}"  # noqa: E731
    for key in sorted(table):
        tt, tc = timings[key]
        lines.append(f"    {key!r}: {table[key]!r},  # triton {fmt(tt)} ms, cuda {fmt(tc)} ms")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dispatch_table_mode(args):
    from fastcl._ext import extension_has_cuda
    from fastcl.ops import dispatch_table as current
    if not extension_has_cuda():
        raise SystemExit("--dispatch-table needs fastcl._C built with its CUDA kernels")
    grid_n = [int(x) for x in args.table_ns.split(",")] if args.table_ns else list(current.GRID_N)
    grid_d = [int(x) for x in args.table_ds.split(",")] if args.table_ds else list(current.GRID_D)
    table, timings = {}, {}
    for op in OPS:
        for dname in args.table_dtypes.split(","):
            dtype = getattr(torch, dname)
            for n in grid_n:
                for d in grid_d:
                    tt = time_op(op, "triton", n, d, dtype, args.rep_ms)
                    tc = time_op(op, "cuda", n, d, dtype, args.rep_ms)
                    if tt is None and tc is None:
                        continue
                    win = "cuda" if tt is None or (tc is not None and tc < (1 - args.table_margin) * tt) else "triton"
                    key = (op, dname, n, d)
                    table[key], timings[key] = win, (tt, tc)
                    print(json.dumps({"op": op, "dtype": dname, "n": n, "d": d, "triton_ms": tt, "cuda_ms": tc,
                                      "pick": win}), flush=True)
    measured_on = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
                   f"{__import__('triton').__version__}, commit {source_commit()}, {time.strftime('%Y-%m-%d')}")
    text = render_dispatch_table(measured_on, grid_n, grid_d, table, timings)
    with open(args.dispatch_table, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
