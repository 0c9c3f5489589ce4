"""Distributed CLIP/SigLIP loss, forward + backward per rank: ring vs all-gather vs naive gather.

Each implementation runs in its own set of spawned ranks, so each rank's peak memory is clean:
on the CPU the rise of peak RSS over the RSS once the process group and the inputs exist; on a
GPU the CUDA allocator's peak above the inputs.  Time is the median over ``--reps`` steps (after one
warm-up step) of the slowest rank (the ranks synchronise through the collectives anyway).

    # CPU, gloo, 4 ranks (the numbers in benchmarks/DISTRIBUTED.md)
    python benchmarks/dist_ring_vs_gather.py --world-size 4 --b-local 2048 --d 256
    # one GPU: the ring code path with world size 1 (the same code, no communication)
    python benchmarks/dist_ring_vs_gather.py --world-size 1 --device cuda --b-local 16384
    # several GPUs on one node: see benchmarks/dist_multi_gpu.sh (torchrun)

Methods: ``ring`` (fastcl ring), ``gather`` (fastcl fused loss on all-gathered features) and
``naive`` (open_clip-style: all-gather with gradient, materialised logits, F.cross_entropy).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = ("ring", "gather", "naive")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loss_fn(method: str, loss: str):
    import torch
    import torch.nn.functional as F

    from fastcl.distributed import all_gather_with_grad
    from fastcl.losses.distributed import clip_loss_distributed, siglip_loss_distributed

    if loss == "siglip":
        if method == "naive":
            def naive_siglip(i, t, s, b):
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                all_t = all_gather_with_grad(t)
                logits = s * i @ all_t.T + b
                z = -torch.ones_like(logits)
                z[:, rank * i.shape[0]:(rank + 1) * i.shape[0]].fill_diagonal_(1.0)
                return -F.logsigmoid(z * logits).sum() / i.shape[0]
            return naive_siglip
        return lambda i, t, s, b: siglip_loss_distributed(i, t, s, b, dist_impl=method)
    if method == "naive":
        def naive_clip(i, t, s, b):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            all_i, all_t = all_gather_with_grad(i), all_gather_with_grad(t)
            labels = torch.arange(i.shape[0], device=i.device) + rank * i.shape[0]
            return 0.5 * (F.cross_entropy(s * i @ all_t.T, labels) + F.cross_entropy(s * t @ all_i.T, labels))
        return naive_clip
    return lambda i, t, s, b: clip_loss_distributed(i, t, s, local_loss=True, dist_impl=method)


def worker(rank: int, args: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    world, device = args["world_size"], args["device"]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if device == "cpu" else 4)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
    g = torch.Generator().manual_seed(rank)
    n, d = args["b_local"], args["d"]
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    scale = torch.tensor(10.0, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    fn = _loss_fn(args["method"], args["loss"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # A tiny step first: one-time costs (lazy imports, op registration, thread pools) must not
    # count as the method's memory.
    tiny = [x.detach()[:8].clone().requires_grad_() for x in (img, txt)]
    fn(tiny[0], tiny[1], scale, bias).backward()
    dist.barrier()
    base_rss = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    times = []
    for step in range(args["reps"] + 1):  # step 0 warms up
        img.grad = txt.grad = scale.grad = bias.grad = None
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn(img, txt, scale, bias).backward()
        sync()
        if step:
            times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if device == "cuda"
            else max(0.0, _max_rss_mb() - base_rss))
    res = {"rank": rank, "time_s": statistics.median(times), "peak_mb": peak}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    time.sleep(0.2)  # let gloo's worker free its last work (it needs the GIL) before the teardown
    dist.destroy_process_group()


JOIN_TIMEOUT_S = 900


def run_method(args: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, args, tmp)) for r in range(args["world_size"])]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        for p in procs:  # a rank stuck after writing its results hung in the group's teardown
            if p.is_alive():
                p.kill()
                p.join()
        if not all(os.path.exists(os.path.join(tmp, f"rank{r}.json")) for r in range(args["world_size"])):
            raise RuntimeError(f"{args['method']}: a rank failed (exit codes {[p.exitcode for p in procs]})")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args["world_size"])]
    return {"method": args["method"], "time_s": max(r["time_s"] for r in ranks),
            "peak_mb_max_rank": max(r["peak_mb"] for r in ranks),
            "peak_mb_per_rank": [round(r["peak_mb"], 1) for r in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--b-local", type=int, default=2048)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {METHODS}")
    rows = []
    print(f"{a.loss} loss fwd+bwd, {a.world_size} rank(s) on {a.device} "
          f"({'gloo' if a.device == 'cpu' else 'nccl'}), B_local={a.b_local}, D={a.d}, {a.dtype}, "
          f"median of {a.reps} steps, {os.cpu_count()} CPU cores")
    print(f"{'method':<8} {'time/step (s)':>14} {'peak MB (max rank)':>19}  per-rank peak MB")
    for m in methods:
        try:
            row = run_method(dict(vars(a), method=m))
        except RuntimeError as e:  # e.g. out of memory for the naive method at large batches
            print(f"{m:<8} {'failed':>14}  ({e})", flush=True)
            rows.append({"method": m, "status": "failed"})
            continue
        rows.append(row)
        print(f"{m:<8} {row['time_s']:>14.3f} {row['peak_mb_max_rank']:>19.1f}  {row['peak_mb_per_rank']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
