"""``fastcl bench``: time and peak memory of fused ops vs naive PyTorch over a batch-size sweep.

Each case builds inputs for a batch size ``n`` and runs forward + backward once per call.
Peak memory is the CUDA allocator's peak above the inputs on a GPU.  On the CPU there is no
allocator counter, so every (case, method) sweep runs in a fresh subprocess and reports the rise
of peak RSS above the RSS once the inputs exist (sizes ascend, so each new peak is its own).
``kernel_profile`` says where one step's time goes, kernel by kernel (the GPU benchmarks use it).
"""
import csv
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastcl import baselines

CSV_FIELDS = ("case", "method", "device", "dtype", "n", "d", "threads", "time_ms", "peak_mem_mb", "speedup", "status")


def source_commit() -> str:
    """The commit benchmark results are tagged with: ``FASTCL_COMMIT`` when set (a copy without
    .git, such as the one a GPU machine gets), else ``git rev-parse --short HEAD`` of the checkout
    this package lives in, else "unknown"."""
    if os.environ.get("FASTCL_COMMIT"):
        return os.environ["FASTCL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def kernel_profile(step, steps: int = 5, device: str = "cuda", top: int = 14) -> dict:
    """Where one ``step()`` spends its time, kernel by kernel (torch.profiler), after one warm-up call.

    Returns ``{"wall_ms_per_step", "busy_ms_per_step", "top": [{"name", "calls_per_step",
    "ms_per_step"}, ...]}``: on a GPU the device kernels and copies by their own device time (busy
    = their sum, so wall - busy is time the GPU waited on the host); on the CPU (smoke test) the
    operators by their own CPU time.  Wall time includes the profiler's overhead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps

    def own_us(e):
        if on_gpu:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    events = [e for e in prof.key_averages()
              if (e.device_type == DeviceType.CUDA) == on_gpu and own_us(e) > 0
              and not getattr(e, "is_user_annotation", False)]
    events.sort(key=own_us, reverse=True)
    rows = [{"name": e.key[:160], "calls_per_step": e.count / steps, "ms_per_step": own_us(e) / 1e3 / steps}
            for e in events]
    return {"wall_ms_per_step": wall_ms, "busy_ms_per_step": sum(r["ms_per_step"] for r in rows),
            "top": rows[:top]}


def host_profile(step, steps: int = 20, device: str = "cuda", top: int = 20) -> dict:
    """How long the host takes to issue one ``step()``, and where that time goes (cProfile), after
    two warm-up calls.

    Returns ``{"host_ms_per_step", "wall_ms_per_step", "top": [{"function", "calls_per_step",
    "own_ms_per_step"}, ...]}``: host time is the time to return from ``step()`` (the device may
    still be working), wall time includes waiting for the device at the end.  Where host time is
    close to wall time, launches bound the step, not the kernels.  The cProfile pass runs after
    the timed one, so its overhead does not enter the times.  On Python 3.12 cProfile books the C
    calls made under a ``torch.library`` custom op to torch's wrapper (``custom_ops.py``'s
    ``backend_impl``): with torch 2.11 on the CPU it showed 0.5 ms own time a call where the op
    costs 27 us more than a direct call; the clock-measured host time is unaffected."""
    import cProfile
    import pstats

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        host += time.perf_counter() - t
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    sync()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return {"host_ms_per_step": host * 1e3 / steps, "wall_ms_per_step": wall_ms,
            "top": [{"function": f"{os.path.basename(f)}:{line}({name})", "calls_per_step": v[0] / steps,
                     "own_ms_per_step": v[2] * 1e3 / steps} for (f, line, name), v in rows]}


def _dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {tuple(table)}, got {name!r}")
    return table[name]


def _unit(n, d, device, dtype, g):
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device=device, dtype=dtype).requires_grad_()


# Each case: make(n, d, device, dtype) -> inputs; methods: name -> fn(inputs, backend) returning
# a tensor to back-propagate (its sum).  "naive" always exists; "fused" runs per backend.
def _clip_case():
    from fastcl.losses import clip_loss

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    methods = {"naive": lambda x, b: baselines.naive_clip(x[0], x[1], 14.3),
               "fused": lambda x, b: clip_loss(x[0], x[1], 14.3, backend=b)}
    try:
        from open_clip.loss import ClipLoss
        methods["open_clip"] = lambda x, b: ClipLoss()(x[0], x[1], 14.3)
    except Exception:
        pass
    return make, methods


def _info_nce_case():
    from fastcl.losses import info_nce

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    return make, {"naive": lambda x, b: baselines.naive_info_nce(x[0], x[1], 0.07),
                  "fused": lambda x, b: info_nce(x[0], x[1], temperature=0.07, backend=b)}


def _ntxent_case():
    from fastcl.losses.ntxent import ntxent_loss

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    methods = {"naive": lambda x, b: baselines.naive_ntxent(x[0], x[1], 0.5),
               "fused": lambda x, b: ntxent_loss(x[0], x[1], 0.5, backend=b)}
    try:
        from lightly.loss import NTXentLoss
        methods["lightly"] = lambda x, b: NTXentLoss(temperature=0.5)(x[0], x[1])
    except Exception:
        pass
    return make, methods


def _siglip_case():
    from fastcl.losses.siglip import siglip_loss

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    return make, {"naive": lambda x, b: baselines.naive_siglip(x[0], x[1], 10.0, -10.0),
                  "fused": lambda x, b: siglip_loss(x[0], x[1], 10.0, -10.0, backend=b)}


def _dcl_case():
    from fastcl.losses.dcl import dcl_loss

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    return make, {"naive": lambda x, b: baselines.naive_dcl(x[0], x[1], 0.1),
                  "fused": lambda x, b: dcl_loss(x[0], x[1], 0.1, backend=b)}


def _hypersphere_case():
    from fastcl.losses.hypersphere import hypersphere_loss

    def make(n, d, dev, dt, g):
        return _unit(n, d, dev, dt, g), _unit(n, d, dev, dt, g)
    return make, {"naive": lambda x, b: baselines.naive_hypersphere(x[0], x[1]),
                  "fused": lambda x, b: hypersphere_loss(x[0], x[1], backend=b)}


def _supcon_case():
    from fastcl.losses.supcon import supcon_loss

    def make(n, d, dev, dt, g):
        f = F.normalize(torch.randn(n, 2, d, generator=g), dim=-1).to(device=dev, dtype=dt).requires_grad_()
        return f, torch.randint(0, 10, (n,), generator=g).to(dev)

    return make, {"naive": lambda x, b: baselines.naive_supcon(x[0], x[1]),
                  "fused": lambda x, b: supcon_loss(x[0], x[1], backend=b)}


def _masking_case():
    from fastcl.masking import random_masking
    tokens, ratio = 196, 0.75  # a ViT-B/16 image; n is the batch

    def make(n, d, dev, dt, g):
        x = torch.randn(n, tokens, d, generator=g).to(device=dev, dtype=dt).requires_grad_()
        return x, torch.rand(n, tokens, generator=g).to(dev)
    return make, {"naive": lambda x, b: baselines.naive_random_masking(x[0], ratio, x[1])[0],
                  "fused": lambda x, b: random_masking(x[0], ratio, noise=x[1], backend=b)[0]}


CASES: Dict[str, Callable] = {"clip": _clip_case, "info_nce": _info_nce_case, "ntxent": _ntxent_case,
                              "supcon": _supcon_case, "siglip": _siglip_case, "dcl": _dcl_case,
                              "hypersphere": _hypersphere_case, "masking": _masking_case}


def available_cases() -> Dict[str, str]:
    """{case: ""} when its fused op imports, else {case: reason}."""
    out = {}
    for name, build in CASES.items():
        try:
            build()
            out[name] = ""
        except Exception as exc:  # a loss still being written, a missing module
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _is_oom(exc: BaseException) -> bool:
    # The CPU allocator says "DefaultCPUAllocator: can't allocate memory" in a plain RuntimeError.
    text = str(exc).lower()
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep(case: str, method: str, backend: Optional[str], sizes: Sequence[int], d: int, device: str,
          dtype: str, reps: int, threads: Optional[int] = None) -> List[Dict]:
    """Time (median ms) and peak memory (MiB) of one method over ascending ``sizes``, in this process.

    ``threads`` sets torch's CPU thread count for this process first (None keeps it).  After the
    first out-of-memory size the larger sizes are recorded as "oom" without running.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    make, methods = CASES[case]()
    fn = methods[method]
    dev, dt = torch.device(device), _dtype(dtype)
    rows, oom = [], False
    for n in sorted(sizes):
        row = {"case": case, "method": method if method != "fused" else f"fastcl:{backend}", "device": device,
               "dtype": dtype, "n": n, "d": d, "threads": torch.get_num_threads(), "time_ms": None,
               "peak_mem_mb": None, "status": "ok"}
        rows.append(row)
        if oom:
            row["status"] = "oom"
            continue
        try:
            g = torch.Generator().manual_seed(n)
            small = make(2, d, dev, dt, g)
            fn(small, backend).float().sum().backward()  # warm-up: lazy imports, kernel compilation
            inputs = make(n, d, dev, dt, g)
            fn(inputs, backend).float().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            else:
                base = _rss_mb()
            times = []
            for _ in range(reps):
                for x in inputs:
                    x.grad = None
                t0 = time.perf_counter()
                fn(inputs, backend).float().sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            times.sort()
            row["time_ms"] = 1e3 * times[len(times) // 2]
            if dev.type == "cuda":
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            else:
                row["peak_mem_mb"] = max(0.0, _max_rss_mb() - base)
            del inputs
        except Exception as exc:
            if not _is_oom(exc):
                raise
            row["status"], oom = "oom", True
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _sweep_subprocess(args: Dict) -> List[Dict]:
    # A fresh process per sweep: peak RSS is monotonic per process, so sweeps must not share one.
    code = "import json,sys;from fastcl.profiling import sweep;print(json.dumps(sweep(**json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        if _is_oom(RuntimeError(out.stderr)) or out.returncode in (-9, 137):
            return [{"case": args["case"], "method": args["method"], "device": args["device"], "dtype": args["dtype"],
                     "n": n, "d": args["d"], "threads": args.get("threads"), "time_ms": None, "peak_mem_mb": None,
                     "status": "oom"}
                    for n in sorted(args["sizes"])]
        raise RuntimeError(f"benchmark {args['case']}/{args['method']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_benchmarks(cases: Sequence[str], backends: Sequence[str], sizes: Sequence[int], *, d: int = 128,
                   device: str = "cpu", dtype: str = "fp32", reps: int = 3, threads: Optional[int] = None,
                   log=print) -> List[Dict]:
    """Every (case, method) sweep; rows carry ``speedup`` = naive time / method time at the same n.

    ``threads``: torch CPU threads for every sweep, naive and fused alike (None: torch's default).
    """
    rows = []
    for case in cases:
        if case not in CASES:
            raise ValueError(f"cases must be among {tuple(CASES)}, got {case!r}")
        _, methods = CASES[case]()
        plan = [(m, None) for m in methods if m != "fused"] + [("fused", b) for b in backends]
        for method, backend in plan:
            args = dict(case=case, method=method, backend=backend, sizes=list(sizes), d=d, device=device,
                        dtype=dtype, reps=reps, threads=threads)
            log(f"  {case:<9} {method if backend is None else 'fastcl:' + backend:<16} n={list(sizes)}")
            rows += _sweep_subprocess(args) if torch.device(device).type == "cpu" else sweep(**args)
    naive = {(r["case"], r["n"]): r["time_ms"] for r in rows if r["method"] == "naive"}
    for r in rows:
        base = naive.get((r["case"], r["n"]))
        r["speedup"] = base / r["time_ms"] if base and r["time_ms"] else None
    return rows


def format_table(rows: List[Dict]) -> str:
    """Plain-text table of the rows."""
    lines = [f"{'case':<9} {'method':<16} {'n':>7} {'time ms':>10} {'peak MiB':>10} {'speed-up':>9}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['case']:<9} {r['method']:<16} {r['n']:>7} {'OOM':>10} {'OOM':>10} {'':>9}")
            continue
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else ""
        lines.append(f"{r['case']:<9} {r['method']:<16} {r['n']:>7} {r['time_ms']:>10.2f} "
                     f"{r['peak_mem_mb']:>10.1f} {sp:>9}")
    return "\n".join(lines)


def write_csv(rows: List[Dict], path: str) -> None:
    """Write the rows to ``path`` as CSV with the columns ``CSV_FIELDS``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def plot(rows: List[Dict], path: str, title: str = "") -> bool:
    """Time and peak memory against batch size on log axes, one column per case; OOM marked with x.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases), 7), squeeze=False)
    for j, case in enumerate(cases):
        for i, (key, label) in enumerate((("time_ms", "time fwd+bwd (ms)"), ("peak_mem_mb", "peak memory (MiB)"))):
            ax = axes[i][j]
            sel = [r for r in rows if r["case"] == case]
            top = max([r[key] for r in sel if r[key]] or [1.0]) * 2
            for m in dict.fromkeys(r["method"] for r in sel):
                pts = [r for r in sel if r["method"] == m]
                ok = [r for r in pts if r["status"] == "ok" and r[key] is not None]
                line, = ax.plot([r["n"] for r in ok], [max(r[key], 1e-3) for r in ok], "o-", label=m)
                bad = [r["n"] for r in pts if r["status"] == "oom"]
                if bad:
                    ax.plot(bad, [top] * len(bad), "x", ms=10, mew=2, color=line.get_color())
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size n")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.set_title(case)
                ax.legend(fontsize=8, title="x = out of memory" if any(r["status"] == "oom" for r in sel) else None,
                          title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def default_backends(device: str) -> List[str]:
    """The fused backends usable for tensors on ``device``."""
    from fastcl._ext import extension_available, extension_has_cuda
    from fastcl.ops.dispatch import triton_available
    if torch.device(device).type == "cuda":
        return (["triton"] if triton_available() else []) + (["cuda"] if extension_has_cuda() else [])
    return ["cpu"] if extension_available() else ["reference"]
