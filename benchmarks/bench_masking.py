"""MAE-style random masking, forward + backward: fastcl vs MAE's gather pattern (issue 5).

CPU (pytest-benchmark; sizes up to the issue's B=64, L=196, D=768, mask 0.75, fp32):

    pytest benchmarks/bench_masking.py --benchmark-columns=mean,median,rounds

or the interleaved CPU report with ratios against MAE (``cpu_masking_report``):

    python benchmarks/bench_masking.py --device cpu --json benchmarks/results/cpu_masking_b64.json

GPU (for benchmarks/gpu_suite.sh): ``gpu_masking_report()`` times each implementation with
``triton.testing.do_bench`` (L2 flushed between runs) next to a ``torch.empty_like().copy_()``
that moves the same number of bytes, and returns JSON-ready rows:

    python benchmarks/bench_masking.py --device cuda --json benchmarks/results/masking_gpu.json

"Bytes that must move" for one forward + backward with K kept of L tokens and e bytes per
element: forward reads and writes K rows, backward reads K gradient rows and writes all L rows
of dx, i.e. ``B * D * e * (3K + L)``.  The copy baseline copies a tensor of half that many
bytes (read + write = the same total), so ``copy_ratio = copy_ms / op_ms`` is the fraction of
device-to-device copy bandwidth reached (target >= 0.8).

Each implementation is timed twice.  ``"timing": "eager"`` rows use ``do_bench``: at this size
they include the CPU's launch overhead (Python, autograd, the custom op).  ``"timing":
"cuda_graph"`` rows replay the same calls from a CUDA graph (``graph_ms``: L2 flushed before each
call as ``do_bench`` does, flush time subtracted), so they measure the GPU work alone; their
``copy_ms`` is the copy timed the same way.  ``--sweep`` adds graph timings of the Triton
row-copy kernels over a grid of launch shapes (ROWS, BLOCK_D, num_warps).
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastcl.baselines import naive_random_masking  # noqa: E402
from fastcl.masking import random_masking  # noqa: E402

CPU_SIZES = [(8, 196, 768), (64, 196, 768)]
RATIO = 0.75


def make_step(impl: str, x: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor,
              pos: Optional[torch.Tensor] = None) -> Callable[[], tuple]:
    """One forward + backward of ``impl`` ("mae" or a fastcl backend name such as "cpu", "triton",
    "cuda"); ``x`` (B, L, D) requires grad, ``noise`` (B, L), ``grad`` (B, K, D)."""
    def step():
        x.grad = None
        if impl == "mae":
            out = naive_random_masking(x, RATIO, noise, pos)
        else:
            out = random_masking(x, RATIO, noise=noise, pos_embed=pos, backend=impl)
        out[0].backward(grad)
        return out
    return step


def inputs(B: int, L: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    noise = torch.rand(B, L, generator=g).to(device)
    keep = int(L * (1 - RATIO))
    grad = torch.randn(B, keep, D, generator=g).to(device=device, dtype=dtype)
    return x, noise, grad


def _result_bytes(out: tuple, x: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in out) + x.grad.numel() * x.grad.element_size()


def temp_memory_bytes(step: Callable[[], tuple], x: torch.Tensor) -> Dict[str, int]:
    """Peak bytes allocated during one ``step()`` and the temporary part of it: the peak minus the
    results that must exist afterwards (the four outputs and ``x.grad``).  CUDA uses the caching
    allocator's counters, the CPU the profiler's memory timeline."""
    step()  # warm-up: lazy initialisation stays out of the count
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            out = step()
        cur = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action == Action.CREATE:
                cur += size
            elif action == Action.DESTROY:
                cur -= size
            peak = max(peak, cur)
    return {"peak_bytes": int(peak), "temp_bytes": int(max(peak - _result_bytes(out, x), 0))}


def moved_bytes(B: int, L: int, D: int, dtype: torch.dtype) -> int:
    """Bytes one masking forward + backward must read and write (module docstring)."""
    keep = int(L * (1 - RATIO))
    return B * D * torch.empty((), dtype=dtype).element_size() * (3 * keep + L)


def graph_ms(fn: Callable[[], object], reps: int = 20, replays: int = 10,
             flush_bytes: int = 256 << 20) -> Optional[float]:
    """Median GPU milliseconds of one ``fn()`` replayed from a CUDA graph, or None if capture fails.

    Two graphs of ``reps`` steps are captured: (zero an L2-sized buffer, ``fn()``) and the zeroing
    alone; the difference of their replay times over ``reps`` is the time of ``fn`` on a cold L2,
    without any CPU launch overhead.  ``fn`` must be capturable (no host syncs)."""
    cache = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    try:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = []
        for with_fn in (True, False):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    cache.zero_()
                    if with_fn:
                        fn()
            graphs.append(g)
    except Exception as exc:  # noqa: BLE001 - any capture failure means "no graph timing"
        print(f"# CUDA graph capture failed ({type(exc).__name__}: {exc}); graph row skipped", file=sys.stderr)
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a broken capture may leave an error behind
            pass
        return None

    def replay_ms(g):
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return max(replay_ms(graphs[0]) - replay_ms(graphs[1]), 0.0) / reps


# Launch shapes tried by --sweep for the Triton row-copy kernel.
SWEEP = [{"ROWS": r, "BLOCK_D": d, "num_warps": w} for r in (4, 8, 16, 32) for d in (128, 256, 512)
         for w in (2, 4, 8)]


def gpu_masking_report(B: int = 256, L: int = 196, D: int = 768, dtype: torch.dtype = torch.bfloat16,
                       impls=("mae", "triton", "cuda"), sweep: bool = False, device: str = "cuda") -> List[Dict]:
    """GPU rows for the suite: forward + backward of each implementation against the copy floor.

    Returns a list of dicts, one per implementation and timing that runs here:
    ``{"impl", "timing", "device", "B", "L", "D", "dtype", "ms", "moved_bytes", "GBps", "copy_ms",
    "copy_ratio", "peak_bytes", "temp_bytes"}`` where ``copy_ratio = copy_ms / ms`` (>= 0.8 is
    the issue's target), ``GBps = moved_bytes / ms`` and ``timing`` is "eager" (``do_bench``) or
    "cuda_graph" (``graph_ms``, the copy timed the same way).  Also rows "<backend>:kernels_only"
    per fused backend: the two fused kernels with precomputed indices (no argsort, no autograd),
    and rows ``{"impl": "<argsort|backend>:indices", "timing": "cuda_graph", "B", "L", "ms"}``:
    the index tensors alone, by torch's argsort path and by each fused backend's rank kernel.
    A backend that cannot run here gives one row ``{"impl", "skipped": reason}``; on a GPU each
    implementation also gets a row ``{"impl", "profile"}`` (``fastcl.profiling.kernel_profile``
    of its eager step).  ``device`` is
    "cuda" except in the CPU smoke test of this function (interpreter, timers stubbed).
    """
    from triton.testing import do_bench

    from fastcl._ext import extension_available, extension_has_cuda
    from fastcl.ops.masking import segment_gather

    dev = device
    nbytes = moved_bytes(B, L, D, dtype)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)

    def copy():
        return torch.empty_like(src).copy_(src)
    copy_ms = {"eager": do_bench(copy), "cuda_graph": graph_ms(copy)}
    x, noise, grad = inputs(B, L, D, dtype, dev)
    rows = []

    def row(impl, timing, ms, mem):
        if ms is None or copy_ms[timing] is None:
            return
        name = torch.cuda.get_device_name() if dev == "cuda" else dev
        rows.append({"impl": impl, "timing": timing, "device": name, "B": B, "L": L,
                     "D": D, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "moved_bytes": nbytes,
                     "GBps": nbytes / ms / 1e6, "copy_ms": copy_ms[timing], "copy_ratio": copy_ms[timing] / ms,
                     **mem})

    no_mem = {"peak_bytes": 0, "temp_bytes": 0}
    steps = {}
    for impl in impls:
        if impl == "cuda" and not (extension_has_cuda() and dev == "cuda"):
            why = "fastcl._C built without CUDA" if extension_available() else "fastcl._C not built"
            rows.append({"impl": impl, "skipped": why})
            continue
        step = make_step(impl, x, noise, grad)
        mem = temp_memory_bytes(step, x)
        row(impl, "eager", do_bench(step), mem)
        row(impl, "cuda_graph", graph_ms(step), mem)
        steps[impl] = step
        if impl != "mae":
            _, _, ids_restore, ids_keep = random_masking(x.detach(), RATIO, noise=noise, backend=impl)

            def kernels(impl=impl, ids_keep=ids_keep, ids_restore=ids_restore):
                segment_gather(x.detach(), ids_keep, None, None, None, None, False, impl)
                segment_gather(grad, ids_restore, None, None, None, None, False, impl)
            row(f"{impl}:kernels_only", "eager", do_bench(kernels), no_mem)
            row(f"{impl}:kernels_only", "cuda_graph", graph_ms(kernels), no_mem)
            if impl == "triton" and sweep:
                from fastcl.kernels.masking import segment_gather as launch
                xd = x.detach()
                for cfg in SWEEP:
                    def shaped(cfg=cfg, ids_keep=ids_keep, ids_restore=ids_restore):
                        launch(xd, ids_keep, config=cfg)
                        launch(grad, ids_restore, config=cfg)
                    name = "triton:kernels_only[r%d_d%d_w%d]" % (cfg["ROWS"], cfg["BLOCK_D"], cfg["num_warps"])
                    try:
                        row(name, "cuda_graph", graph_ms(shaped), no_mem)
                    except Exception as exc:  # noqa: BLE001 - one bad shape must not end the sweep
                        rows.append({"impl": name, "skipped": f"{type(exc).__name__}: {exc}"})
    # The index tensors alone (ids_restore, ids_keep, mask from the noise): torch's argsort path,
    # and the rank kernel of each fused backend that ran above.
    from fastcl.ops import masking as ops_masking
    keep = int(L * (1 - RATIO))
    index_steps = {"argsort:indices": lambda: ops_masking.mask_indices(noise, keep, "reference")}
    for impl in steps:
        if impl != "mae":
            index_steps[f"{impl}:indices"] = (
                lambda impl=impl: ops_masking._mask_indices(noise, keep, torch.get_default_dtype(), impl))
    for name, fn in index_steps.items():
        rows.append({"impl": name, "timing": "cuda_graph", "B": B, "L": L, "ms": graph_ms(fn)})
    if dev == "cuda":  # after every timing: where each eager step's time goes, kernel by kernel
        from fastcl.profiling import kernel_profile
        for impl, step in steps.items():
            try:
                rows.append({"impl": impl, "profile": kernel_profile(step, steps=20, top=10)})
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the report
                rows.append({"impl": impl, "profile_error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def cpu_masking_report(B: int = 64, L: int = 196, D: int = 768, rounds: int = 5, reps: int = 10,
                       impls=("mae", "cpu")) -> List[Dict]:
    """CPU rows (fp32, forward + backward): ``{"impl", "device", "B", "L", "D", "dtype", "ms",
    "round_ms", "peak_bytes", "temp_bytes"}`` plus, for each fastcl impl, ``"speedup_vs_mae"`` and
    ``"min_round_speedup"``.  The implementations take turns, ``rounds`` times ``reps`` calls each,
    so drift of a shared machine falls on all of them; ``ms`` is the median of the round medians."""
    import time
    steps, rows = {}, {}
    for impl in impls:
        x, noise, grad = inputs(B, L, D)
        steps[impl] = make_step(impl, x, noise, grad)
        rows[impl] = {"impl": impl, "device": "cpu", "B": B, "L": L, "D": D, "dtype": "float32",
                      "round_ms": [], **temp_memory_bytes(steps[impl], x)}
    for _ in range(rounds):
        for impl in impls:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                steps[impl]()
                times.append((time.perf_counter() - t0) * 1e3)
            rows[impl]["round_ms"].append(sorted(times)[len(times) // 2])
    for r in rows.values():
        r["ms"] = sorted(r["round_ms"])[len(r["round_ms"]) // 2]
    if "mae" in rows:
        base = rows["mae"]
        for impl, r in rows.items():
            if impl != "mae":
                r["speedup_vs_mae"] = base["ms"] / r["ms"]
                r["min_round_speedup"] = min(m / f for m, f in zip(base["round_ms"], r["round_ms"]))
                r["temp_ratio_vs_mae"] = base["temp_bytes"] / max(r["temp_bytes"], 1)
    return list(rows.values())


# ---- pytest-benchmark (CPU) ---------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the GPU/CLI path does not need pytest
    pytest = None

if pytest is not None:
    from fastcl._ext import extension_available

    CPU_IMPLS = ["mae", "cpu"] if extension_available() else ["mae", "reference"]

    @pytest.mark.parametrize("size", CPU_SIZES, ids=lambda s: "x".join(map(str, s)))
    @pytest.mark.parametrize("impl", CPU_IMPLS)
    def test_masking_fwd_bwd_cpu(benchmark, impl, size):
        x, noise, grad = inputs(*size)
        step = make_step(impl, x, noise, grad)
        benchmark.extra_info.update(temp_memory_bytes(step, x))
        benchmark(step)


def main(argv=None):
    from fastcl.cli import _positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--L", type=int, default=196)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true", help="also time the Triton kernels over launch shapes")
    p.add_argument("--rounds", type=_positive_int, default=5, help="CPU: interleaved rounds of 10 calls per impl")
    a = p.parse_args(argv)
    if a.device == "cuda":
        rows = gpu_masking_report(B=a.B or 256, L=a.L, D=a.D, sweep=a.sweep)
    else:
        rows = cpu_masking_report(B=a.B or 64, L=a.L, D=a.D, rounds=a.rounds)
    for r in rows:
        print(json.dumps(r))
    # Compact summary last: the GPU suite shows only the tail of this output.
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            # Wall time here includes the profiler's overhead; the eager rows give the true step time.
            print(f"# {r['impl']:<34} profile: GPU busy {p['busy_ms_per_step']:.3f} ms per step "
                  f"(wall {p['wall_ms_per_step']:.3f} ms under the profiler)")
        elif "profile_error" in r:
            print(f"# {r['impl']:<34} profile failed: {r['profile_error']}")
        elif "ms" in r:
            ratio = f"  copy_ratio {r['copy_ratio']:.2f}" if "copy_ratio" in r else ""
            if "speedup_vs_mae" in r:
                ratio = (f"  {r['speedup_vs_mae']:.2f}x vs mae (min round {r['min_round_speedup']:.2f}x),"
                         f" temp memory {r['temp_ratio_vs_mae']:.0f}x less")
            print(f"# {r['impl']:<34} {r.get('timing', ''):<10} {r['ms']:.4f} ms{ratio}")
        else:
            print(f"# {r['impl']:<34} skipped: {r.get('skipped')}")
    if a.json:
        import time

        from fastcl.profiling import source_commit
        commit = source_commit()
        meta = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit,
                "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
