"""The ``fastcl`` command line: ``train`` (the digits demo), ``bench`` (profiling), ``info``."""
import argparse
import math
import os
import platform
import sys
import time
from typing import List, Optional

DEVICES_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu)"
QUICK_SIZES, CPU_SIZES, GPU_SIZES = [64, 256, 1024], [256, 1024, 4096, 8192], [1024, 4096, 16384, 65536, 131072]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _int_list(text: str) -> List[int]:
    values = [_positive_int(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch to parse
# AdamW's bias-corrected update is at most lr / (1 - beta1) = 10 lr with the demo's default betas;
# its parameters are float32, so a larger lr fails inside the optimizer ("cannot be converted to float").
ADAMW_STEP_FACTOR = 10


def _seed(text: str) -> int:
    """0 <= seed <= 2**63 - 1.  torch.manual_seed takes [-2**63, 2**64), but the trainer seeds each
    epoch's data order with seed + 1_000_003 * (epoch + 1), which must stay below 2**64, and it
    rejects negative seeds; the int64 bound leaves room for any reachable epoch count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {value}")
    return value


def _threads(text: str) -> int:
    """1 <= threads <= 4 x the CPU count: far more threads than cores only slows torch down, and
    enough of them abort the process (libgomp cannot create them, or a MemoryError)."""
    value = _positive_int(text)
    cores = os.cpu_count() or 1
    if value > 4 * cores:
        raise argparse.ArgumentTypeError(f"expected at most {4 * cores} (4 x the {cores} CPU cores), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _lr(text: str) -> float:
    value = _positive_float(text)
    if value * ADAMW_STEP_FACTOR > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"expected at most {FLOAT32_MAX / ADAMW_STEP_FACTOR:.4g} (AdamW's update, "
                                         f"up to {ADAMW_STEP_FACTOR} x lr, must fit in float32), got {text}")
    return value


def _temperature(text: str) -> float:
    value = _positive_float(text)
    if 1.0 / value > FLOAT32_MAX:  # the losses' own check (fastcl.ops.reference.check_fits), made up front
        raise argparse.ArgumentTypeError(f"expected at least {1 / FLOAT32_MAX:.4g} (the losses scale by "
                                         f"1/temperature in float32, and 1/{text} overflows it), got {text}")
    return value


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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def _sizes(sizes: List[int]) -> str:
    return ",".join(map(str, sizes))


def build_parser() -> argparse.ArgumentParser:
    """The ``fastcl`` parser.  Each subcommand's parser is its ``cmd_parser`` default, so checks made
    after parsing report through it (its usage line, ``fastcl train: error: ...``)."""
    from fastcl import __version__
    from fastcl.demo import ENCODERS, LOSSES
    from fastcl.ops.dispatch import BACKENDS
    from fastcl.profiling import CASES

    p = argparse.ArgumentParser(prog="fastcl", description="Fused contrastive-learning losses: demo, profiling, info.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,bench,info}")
    sub.required = True

    t = sub.add_parser("train", help="SimCLR on scikit-learn's 8x8 digits, then a 5-shot linear probe")
    t.set_defaults(cmd_parser=t)
    t.add_argument("--loss", choices=LOSSES, default="ntxent", help="two-view loss (default: %(default)s)")
    t.add_argument("--epochs", type=_positive_int, default=320, help="(default: %(default)s)")
    t.add_argument("--batch-size", type=_positive_int, default=256,
                   help="samples per step and per process (default: %(default)s)")
    t.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="gradient caching: run the encoder this many samples at a time, for less activation "
                        "memory. Not only a memory knob: BatchNorm (in both demo encoders and the head) then "
                        "normalises each chunk with its own statistics, which changes the objective "
                        "(default: the whole batch at once)")
    t.add_argument("--device", default=None, help=DEVICES_HELP)
    t.add_argument("--backend", choices=BACKENDS, default=None,
                   help="fastcl backend (default: FASTCL_BACKEND when set, else auto)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="(default: %(default)s)")
    t.add_argument("--encoder", choices=tuple(ENCODERS), default="cnn", help="(default: %(default)s)")
    t.add_argument("--lr", type=_lr, default=3e-3, help="peak learning rate (default: %(default)s)")
    t.add_argument("--temperature", type=_temperature, default=0.5, help="(default: %(default)s)")
    t.add_argument("--seed", type=_seed, default=0, help="(default: %(default)s)")
    t.add_argument("--out", default=None,
                   help="directory for metrics.jsonl and checkpoint.pt (default: write no files)")
    t.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint.pt written by --out, up to --epochs (default: start afresh)")
    t.add_argument("--limit", type=_positive_int, default=None,
                   help="use only this many training images (default: all)")
    t.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many steps (default: run every epoch)")
    t.add_argument("--probe-repeats", type=_positive_int, default=10,
                   help="random 5-shot draws averaged (default: %(default)s)")
    t.add_argument("--threads", type=_threads, default=1,
                   help="torch CPU threads (default: %(default)s; these tiny ops gain little from more, and extra "
                        "threads slow down badly when other work shares the cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="time and peak memory of fused ops vs naive PyTorch; CSV + PNG")
    b.set_defaults(cmd_parser=b)
    b.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: %(default)s)")
    b.add_argument("--backends", default=None, help="comma-separated fastcl backends (default: the usable ones)")
    b.add_argument("--sizes", type=_int_list, default=None,
                   help=f"comma-separated batch sizes (default: {_sizes(CPU_SIZES)} on the CPU, "
                        f"{_sizes(GPU_SIZES)} on a GPU, {_sizes(QUICK_SIZES)} with --quick)")
    b.add_argument("--dim", type=_positive_int, default=128, help="embedding size D (default: %(default)s)")
    b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="(default: fp32 on the CPU, bf16 on a GPU)")
    b.add_argument("--reps", type=_positive_int, default=None,
                   help="timed calls per point, median reported (default: 5, or 2 with --quick)")
    b.add_argument("--device", default=None, help=DEVICES_HELP)
    b.add_argument("--threads", type=_threads, default=1,
                   help="torch CPU threads for naive and fused alike, recorded with the results (default: "
                        "%(default)s; extra threads slow down badly when other work shares the cores, which "
                        "distorts the ratios)")
    b.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CPU smoke run)")
    b.add_argument("--out", default=".",
                   help="directory for bench.csv, bench.json and bench.png (default: %(default)s)")
    b.add_argument("--no-plot", action="store_true", help="no bench.png")

    i = sub.add_parser("info", help="versions, devices, and which backends are available (and why not)")
    i.set_defaults(cmd_parser=i)
    return p


def _check_backend(parser: argparse.ArgumentParser, flag: str, name: Optional[str], device: str) -> None:
    """Exit with a ``parser`` error naming ``flag`` when backend ``name`` (None: FASTCL_BACKEND, else
    auto) cannot run on ``device``, before any slow work."""
    import torch

    from fastcl.ops.dispatch import resolve_backend
    try:
        resolve_backend(name, torch.device(device))
    except (ValueError, RuntimeError) as exc:
        parser.error(f"{flag} {name}: {exc}" if name is not None else str(exc))


def cmd_train(args, parser) -> int:
    """``fastcl train``: check the arguments, run the digits demo; under torchrun only rank 0 prints."""
    from fastcl.demo import load_digits_split, run, schedule_steps
    if args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 (contrastive losses need negatives), got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size > args.batch_size:
        parser.error(f"--chunk-size must be <= --batch-size, got {args.chunk_size} > {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < args.batch_size and \
            (args.chunk_size == 1 or args.batch_size % args.chunk_size == 1):
        # BatchNorm1d in training mode needs at least 2 samples per chunk it normalises.
        parser.error(f"--chunk-size {args.chunk_size} splits --batch-size {args.batch_size} into chunks of which one "
                     f"holds a single sample, and BatchNorm needs at least 2; pick another --chunk-size")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resumed = _check_resume(parser, args, world) if args.resume is not None else None
    device = _check_device(parser, args.device or _default_device())
    _check_backend(parser, "--backend", args.backend, device)
    try:
        n_train = len(load_digits_split(seed=args.seed)[1])
    except RuntimeError as exc:  # scikit-learn is missing
        parser.error(str(exc))
    n_train = min(n_train, args.limit or n_train)
    # The last rank's share is the smallest; every rank checks it, so all of them stop or none.
    per_process = n_train // world
    if args.batch_size > per_process:
        why = ([f"--limit {args.limit}"] if args.limit else []) + \
            ([f"{n_train} split over {world} processes"] if world > 1 else [])
        parser.error(f"--batch-size {args.batch_size} is larger than the {per_process} training images per process"
                     + (f" ({', '.join(why)})" if why else "") + "; lower --batch-size")
    if resumed is not None:
        # The LR schedule's length is in the checkpoint: a run of another length would step it past
        # its end (a longer one) or end it early without saying so (a shorter one).
        steps = schedule_steps(n_train, args.epochs, args.batch_size, world)
        sched = resumed["scheduler"]
        saved = sched.get("total_steps") if isinstance(sched, dict) else None
        if saved != (steps if steps > 1 else None):
            parser.error(f"--resume {args.resume}: the checkpoint's learning-rate schedule spans {saved} steps and this "
                         f"run's {steps} (--epochs {args.epochs}, --batch-size, --limit and the number of processes "
                         "set it); resume with the settings the checkpoint was written with")
    if args.out is not None:
        _make_out_dir(parser, args.out)
    import torch
    torch.set_num_threads(args.threads)
    device = _init_distributed_from_env(device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    start = time.perf_counter()
    # The other ranks train like rank 0 but neither probe nor print: one table, not one per rank.
    try:
        run(loss=args.loss, epochs=args.epochs, batch_size=args.batch_size, chunk_size=args.chunk_size,
            device=device, backend=args.backend, seed=args.seed, out=args.out, lr=args.lr,
            temperature=args.temperature, encoder=args.encoder, limit=args.limit, probe_repeats=args.probe_repeats,
            progress=not args.no_progress, max_steps=args.max_steps, precision=args.precision,
            log=print if rank == 0 else (lambda *a, **k: None), probe=rank == 0, resume=args.resume)
    except FloatingPointError as exc:  # the Trainer's check of each step's loss: the run diverged
        parser.exit(1, f"{parser.prog}: error: training diverged: {exc} (--lr {args.lr:g}, --temperature "
                       f"{args.temperature:g}); try a lower --lr or a higher --temperature\n")
    if rank == 0:
        if world > 1:
            print(f"torchrun: {world} processes, each training on its 1/{world} share of the {n_train} training "
                  f"images with batches of {args.batch_size} ({world * args.batch_size} per step in all)")
        print(f"total wall time {time.perf_counter() - start:.1f}s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _check_resume(parser: argparse.ArgumentParser, args, world: int) -> dict:
    """Exit with a ``parser`` error naming --resume unless it is a checkpoint this run can continue:
    one ``fastcl train --out`` wrote, with this --seed, --batch-size, --encoder and number of
    processes (``world``); returns its state
    (the caller checks the schedule's length).  Read here, before any slow work, rather than after
    the untrained probe, deep in the Trainer."""
    import torch

    from fastcl.demo import ENCODERS
    from fastcl.train import CHECKPOINT_KEYS, data_order_mismatch, upgrade_checkpoint
    path = args.resume
    if not os.path.isfile(path):
        parser.error(f"--resume {path}: no such checkpoint file")
    what = "not a checkpoint written by fastcl train --out"
    try:
        # The Trainer loads it the same way (weights_only=False: a scheduler's state may hold Python objects).
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # UnpicklingError, a truncated archive's RuntimeError, EOFError, OSError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        parser.error(f"--resume {path}: {what} ({type(exc).__name__}{': ' + first if first else ''})")
    state = upgrade_checkpoint(state, world)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS) or \
            not isinstance(state["model"], dict):
        parser.error(f"--resume {path}: {what}")
    mismatch = data_order_mismatch(state, args.seed, args.batch_size, world)
    if mismatch is not None:
        key, saved, here = mismatch
        if key == "world_size":
            parser.error(f"--resume {path}: the checkpoint was written by {saved} process(es), not {here}; "
                         "resume with as many processes (they split the data order)")
        parser.error(f"--resume {path}: the checkpoint was written with --{key.replace('_', '-')} {saved}, not "
                     f"{here}; they must match to resume the same data order")
    want = {k: tuple(v.shape) for k, v in ENCODERS[args.encoder]().state_dict().items()}
    got = {k[len("encoder."):]: tuple(getattr(v, "shape", ())) for k, v in state["model"].items()
           if k.startswith("encoder.")}
    if got != want:
        parser.error(f"--resume {path}: the checkpoint's encoder is not this run's --encoder {args.encoder}")
    return state


def _make_out_dir(parser: argparse.ArgumentParser, out: str) -> None:
    """Create the --out directory (or accept an existing one) before any slow work; a parser error
    naming --out when it is a file, cannot be created, or cannot be written to."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out}: cannot create the directory ({exc.strerror or exc})")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: the directory is not writable")


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
    """``fastcl bench``: time the fused ops against naive PyTorch; writes bench.csv, bench.json, bench.png."""
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
    if not cases:
        parser.error(f"--cases: no case named in {args.cases!r}; choose among {','.join(profiling.CASES)}")
    backends = profiling.default_backends(device) if args.backends is None else \
        [x.strip() for x in args.backends.split(",") if x.strip()]
    if args.backends is not None and not backends:
        parser.error(f"--backends: no backend named in {args.backends!r}; choose among {','.join(BACKENDS[1:])}")
    for name in backends:
        if name not in BACKENDS or name == "auto":
            parser.error(f"--backends: unknown backend {name!r}; choose among {','.join(BACKENDS[1:])}")
        _check_backend(parser, "--backends", name, device)
    missing = profiling.available_cases()
    for c in [c for c in cases if missing[c]]:
        print(f"skipping {c}: {missing[c]}")
    cases = [c for c in cases if not missing[c]]
    if not cases:
        parser.error("--cases: none of the requested cases can run here")
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = QUICK_SIZES
    else:
        sizes = GPU_SIZES if cuda else CPU_SIZES
    if max(sizes) * args.dim > INT64_MAX:  # torch cannot even describe an (n, D) tensor that big
        parser.error(f"--sizes {max(sizes)} with --dim {args.dim}: an (n, D) tensor that big is beyond torch's "
                     f"limit of 2**63 - 1 elements")
    reps = args.reps or (2 if args.quick else 5)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    _make_out_dir(parser, args.out)
    torch.set_num_threads(args.threads)
    print(f"fastcl bench on {device} ({dtype}, D={args.dim}, median of {reps}, {args.threads} torch threads), "
          f"backends {backends}:")
    rows = profiling.run_benchmarks(cases, backends, sizes, d=args.dim, device=device, dtype=dtype, reps=reps,
                                    threads=args.threads)
    print(profiling.format_table(rows))
    csv_path = os.path.join(args.out, "bench.csv")
    profiling.write_csv(rows, csv_path)
    meta = {"device": _device_name(device), "torch": torch.__version__, "dtype": dtype, "dim": args.dim,
            "reps": reps, "threads": args.threads, "backends": backends,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
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
    """``fastcl info``: versions, devices, backends and the settings that steer them (invalid ones marked)."""
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
    if ext:
        try:
            rows.append(("cpu", True, f"C++ extension fastcl._C, {_ext._C.cpu_gemm()} GEMM for fp32 tiles"))
        except RuntimeError as exc:  # a bad FASTCL_CPU_GEMM, which fails the fp32 CPU kernels the same way
            rows.append(("cpu", False, f"C++ extension fastcl._C, fp32 tile GEMM invalid ({exc})"))
    else:
        rows.append(("cpu", False, f"fastcl._C not built ({_ext._error}); run pip install --no-build-isolation -e ."))
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
    from fastcl.ops.dispatch import requested_backend, resolve_backend
    env = os.environ.get("FASTCL_BACKEND")
    source = "auto picks" if env is None else f"FASTCL_BACKEND={env}"
    try:
        name = requested_backend(None)
    except ValueError as exc:
        print(f"{source}: invalid ({exc})")
    else:
        picks = []
        for dev in ("cpu", "cuda") if cuda else ("cpu",):
            try:
                picks.append(f"{dev} tensors -> {resolve_backend(name, torch.device(dev))}")
            except (ValueError, RuntimeError) as exc:
                picks.append(f"{dev} tensors -> unusable ({exc})")
        print(f"{source}: " + ", ".join(picks))
    from fastcl.profiling import available_cases
    cases = available_cases()
    width = max(map(len, cases), default=0)
    for case, why in cases.items():
        print(f"  op {case:<{width}} {'available' if not why else 'missing: ' + why}")
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
            override = K.tile_override()
            what = ", ".join(f"{name} " + ",".join(map(str, K.gpu_launch_shape(dt)))
                             for name, dt in (("half", torch.bfloat16), ("fp32", torch.float32)))
            if override:
                what += " (FASTCL_TRITON_TILE)"
            else:
                what += ", half row-only forward " + ",".join(map(str, K.gpu_launch_shape(torch.bfloat16,
                                                                                          role="lse_rows")))
        except ValueError as exc:
            what = f"invalid ({exc})"
        try:
            if K.autotune_enabled():
                what += "; FASTCL_TRITON_AUTOTUNE=1 picks among the autotuner's shapes"
        except ValueError as exc:
            what += f"; {exc}"
        print(f"Triton launch shape (BLOCK_M,BLOCK_N,BLOCK_D,warps,stages[,forward maxnreg] at D=768): {what}")
        modes = []
        for knob, default, check in (("FASTCL_TRITON_BWD", "auto", lambda: K.backward_mode(0)),
                                     ("FASTCL_TRITON_EXP", "exact", K.exp_mode)):
            try:
                check()  # the kernels' own validation; BWD's "auto" resolves per op, so show the setting
                modes.append(f"{knob}={os.environ.get(knob, default)}")
            except ValueError as exc:
                modes.append(f"{knob} invalid ({exc})")
        print(f"Triton modes: {', '.join(modes)}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastcl`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "bench": cmd_bench, "info": cmd_info}[args.command]
    try:
        status = handler(args, args.cmd_parser)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as for a command the closed pipe killed


if __name__ == "__main__":
    sys.exit(main())
