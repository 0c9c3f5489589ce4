"""The ``fastcl`` command line: ``train`` (the digits demo), ``bench`` (profiling), ``info``."""
import argparse
import os
import platform
import sys
import time
from typing import List, Optional

DEVICES_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _int_list(text: str) -> List[int]:
    return [_positive_int(t) for t in text.split(",") if t.strip()]


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(parser: argparse.ArgumentParser, device: str) -> str:
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"--device: not a device: {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def build_parser() -> argparse.ArgumentParser:
    from fastcl.demo import ENCODERS, LOSSES
    from fastcl.ops.dispatch import BACKENDS
    from fastcl.profiling import CASES

    p = argparse.ArgumentParser(prog="fastcl", description="Fused contrastive-learning losses: demo, profiling, info.")
    sub = p.add_subparsers(dest="command", metavar="{train,bench,info}")
    sub.required = True

    t = sub.add_parser("train", help="SimCLR on scikit-learn's 8x8 digits, then a 5-shot linear probe")
    t.add_argument("--loss", choices=LOSSES, default="ntxent", help="two-view loss (default ntxent)")
    t.add_argument("--epochs", type=_positive_int, default=320)
    t.add_argument("--batch-size", type=_positive_int, default=256)
    t.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="gradient caching: run the encoder this many samples at a time")
    t.add_argument("--device", default=None, help=DEVICES_HELP)
    t.add_argument("--backend", choices=BACKENDS, default=None, help="fastcl backend (default auto)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    t.add_argument("--encoder", choices=tuple(ENCODERS), default="cnn")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--temperature", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="directory for metrics.jsonl and checkpoint.pt")
    t.add_argument("--limit", type=_positive_int, default=None, help="use only this many training images")
    t.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    t.add_argument("--probe-repeats", type=_positive_int, default=10, help="random 5-shot draws averaged")
    t.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: these tiny ops gain little from more, and extra "
                        "threads slow down badly when other work shares the cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="time and peak memory of fused ops vs naive PyTorch; CSV + PNG")
    b.add_argument("--cases", default=",".join(CASES), help=f"comma-separated among {','.join(CASES)}")
    b.add_argument("--backends", default=None, help="comma-separated fastcl backends (default: the usable ones)")
    b.add_argument("--sizes", type=_int_list, default=None, help="comma-separated batch sizes")
    b.add_argument("--dim", type=_positive_int, default=128, help="embedding size D")
    b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default fp32 on the CPU, bf16 on a GPU")
    b.add_argument("--reps", type=_positive_int, default=None, help="timed calls per point (median)")
    b.add_argument("--device", default=None, help=DEVICES_HELP)
    b.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CPU smoke run)")
    b.add_argument("--out", default=".", help="directory for bench.csv, bench.json and bench.png")
    b.add_argument("--no-plot", action="store_true")

    sub.add_parser("info", help="versions, devices, and which backends are available (and why not)")
    return p


def cmd_train(args, parser) -> int:
    from fastcl.demo import run
    if args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 (contrastive losses need negatives), got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size > args.batch_size:
        parser.error(f"--chunk-size must be <= --batch-size, got {args.chunk_size} > {args.batch_size}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    device = _check_device(parser, args.device or _default_device())
    import torch
    torch.set_num_threads(args.threads)
    device = _init_distributed_from_env(device)
    start = time.perf_counter()
    run(loss=args.loss, epochs=args.epochs, batch_size=args.batch_size, chunk_size=args.chunk_size, device=device,
        backend=args.backend, seed=args.seed, out=args.out, lr=args.lr, temperature=args.temperature,
        encoder=args.encoder, limit=args.limit, probe_repeats=args.probe_repeats, progress=not args.no_progress,
        max_steps=args.max_steps, precision=args.precision)
    print(f"total wall time {time.perf_counter() - start:.1f}s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _init_distributed_from_env(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) and
    return this rank's device; otherwise return ``device`` unchanged."""
    import os

    import torch
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device


def cmd_bench(args, parser) -> int:
    import json

    import torch

    from fastcl import profiling
    from fastcl.ops.dispatch import BACKENDS
    device = _check_device(parser, args.device or _default_device())
    cuda = torch.device(device).type == "cuda"
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in profiling.CASES:
            parser.error(f"--cases: unknown case {c!r}; choose among {','.join(profiling.CASES)}")
    backends = profiling.default_backends(device) if args.backends is None else \
        [x.strip() for x in args.backends.split(",") if x.strip()]
    for name in backends:
        if name not in BACKENDS or name == "auto":
            parser.error(f"--backends: unknown backend {name!r}; choose among {','.join(BACKENDS[1:])}")
    missing = profiling.available_cases()
    for c in [c for c in cases if missing[c]]:
        print(f"skipping {c}: {missing[c]}")
    cases = [c for c in cases if not missing[c]]
    if not cases:
        parser.error("--cases: none of the requested cases can run here")
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [64, 256, 1024]
    else:
        sizes = [1024, 4096, 16384, 65536, 131072] if cuda else [256, 1024, 4096, 8192]
    reps = args.reps or (2 if args.quick else 5)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    os.makedirs(args.out, exist_ok=True)
    print(f"fastcl bench on {device} ({dtype}, D={args.dim}, median of {reps}), backends {backends}:")
    rows = profiling.run_benchmarks(cases, backends, sizes, d=args.dim, device=device, dtype=dtype, reps=reps)
    print(profiling.format_table(rows))
    csv_path = os.path.join(args.out, "bench.csv")
    profiling.write_csv(rows, csv_path)
    meta = {"device": _device_name(device), "torch": torch.__version__, "dtype": dtype, "dim": args.dim,
            "reps": reps, "backends": backends, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {csv_path} and bench.json")
    if not args.no_plot:
        png = os.path.join(args.out, "bench.png")
        if profiling.plot(rows, png, title=f"fastcl on {meta['device']} ({dtype}, D={args.dim})"):
            print(f"wrote {png}")
        else:
            print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


def _device_name(device: str) -> str:
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "not installed"


def cmd_info(args, parser) -> int:
    import torch

    import fastcl
    from fastcl import _ext
    from fastcl.ops.dispatch import triton_available, triton_interpreting
    print(f"fastcl {fastcl.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    for pkg in ("triton", "numpy", "scikit-learn", "tqdm", "matplotlib"):
        print(f"  {pkg:<13} {_version(pkg)}")
    cuda = torch.cuda.is_available()
    print(f"devices: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (CUDA {torch.version.cuda})")
    else:
        print(f"  no CUDA device (torch built with CUDA {torch.version.cuda})")
    ext, ext_cuda = _ext.extension_available(), _ext.extension_has_cuda()
    rows = [("reference", True, "pure PyTorch, always available")]
    rows.append(("cpu", ext, f"C++ extension fastcl._C, {_ext._C.cpu_gemm()} GEMM for fp32 tiles" if ext else
                 f"fastcl._C not built ({_ext._error}); run pip install --no-build-isolation -e ."))
    if not triton_available():
        rows.append(("triton", False, "Triton is not installed (pip install triton)"))
    elif cuda:
        rows.append(("triton", True, "Triton kernels on CUDA"))
    else:
        rows.append(("triton", triton_interpreting(), "interpreter on CPU (TRITON_INTERPRET=1)" if
                     triton_interpreting() else "installed, but no CUDA device (set TRITON_INTERPRET=1 to "
                     "run the kernels in the interpreter)"))
    if not ext:
        rows.append(("cuda", False, "fastcl._C not built"))
    elif not ext_cuda:
        why = ("torch has no CUDA" if torch.version.cuda is None else
               "rebuild it where nvcc is: pip install --no-build-isolation -e . (CUDA_HOME names the toolkit)")
        rows.append(("cuda", False, f"fastcl._C was built without CUDA ({why})"))
    else:
        rows.append(("cuda", cuda, "CUDA kernels in fastcl._C" if cuda else "built with CUDA, but no CUDA device"))
    print("backends:")
    for name, ok, why in rows:
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    _print_cuda_settings()
    from fastcl.ops.dispatch import resolve_backend
    print(f"auto picks: cpu tensors -> {resolve_backend('auto', torch.device('cpu'))}"
          + (f", cuda tensors -> {resolve_backend('auto', torch.device('cuda'))}" if cuda else ""))
    from fastcl.profiling import available_cases
    for case, why in available_cases().items():
        print(f"  op {case:<9} {'available' if not why else 'missing: ' + why}")
    return 0


def _print_cuda_settings() -> None:
    """The GPU backends' workspace bound, where ``auto``'s triton/cuda table comes from, and the
    Triton kernels' launch shape."""
    import torch

    from fastcl.ops import dispatch_table, strips
    try:
        ws = f"{strips.workspace_mb():g} MB"
    except ValueError as exc:
        ws = f"invalid ({exc})"
    source = ("WORKSPACE_MB" if strips.WORKSPACE_MB is not None else
              "FASTCL_WORKSPACE_MB" if "FASTCL_WORKSPACE_MB" in os.environ else "default")
    print(f"GPU workspace (triton and cuda strips): {ws} ({source}; set FASTCL_WORKSPACE_MB to change)")
    if dispatch_table.MEASURED_ON:
        print(f"auto on CUDA, triton vs cuda: table measured on {dispatch_table.MEASURED_ON}")
    else:
        print(f"auto on CUDA, triton vs cuda: table not measured yet, {dispatch_table.DEFAULT} everywhere")
    from fastcl.ops.dispatch import triton_available
    if triton_available():
        from fastcl.kernels import similarity_lse as K
        try:
            what = ", ".join(f"{name} " + ",".join(map(str, K.gpu_launch_shape(dt)))
                             for name, dt in (("half", torch.bfloat16), ("fp32", torch.float32)))
            what += " (FASTCL_TRITON_TILE)" if K.tile_override() else ""
        except ValueError as exc:
            what = f"invalid ({exc})"
        try:
            if K.autotune_enabled():
                what += "; FASTCL_TRITON_AUTOTUNE=1 picks among the autotuner's shapes"
        except ValueError as exc:
            what += f"; {exc}"
        print(f"Triton launch shape (BLOCK_M,BLOCK_N,BLOCK_D,warps,stages[,forward maxnreg] at D=768): {what}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastcl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "bench": cmd_bench, "info": cmd_info}[args.command]
    return handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
