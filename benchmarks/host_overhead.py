"""Host time of one eager loss step at a tiny size, with and without the custom ops' dispatch.

At N=8, D=4 the kernels take microseconds, so a step's time is host time: argument checks,
backend choice, autograd, and (with ``--dispatch custom_op``) the ``torch.library`` dispatch that
plain eager calls skip since ``fastcl/ops/eager.py``.  Both modes are timed in turns in one run
(best of ``--rounds`` rounds of ``--steps`` forward + backward steps, one thread):

    python benchmarks/host_overhead.py --json benchmarks/results/cpu_host_overhead.json
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastcl  # noqa: E402
from fastcl.ops.eager import needs_custom_op  # noqa: E402

# The op modules that pick the custom op or the eager Function per call.
OP_MODULES = ("fastcl.ops.similarity_lse", "fastcl.ops.sigmoid_pair")


def force_custom_op(forced: bool) -> None:
    """Make the op modules take the custom op on every call (True) or decide as usual (False)."""
    for name in OP_MODULES:
        sys.modules[name].needs_custom_op = (lambda *t: True) if forced else needs_custom_op


def _losses(backend: str):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, generator=g).requires_grad_()
    k = torch.randn(8, 4, generator=g).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    return {
        "clip": lambda: fastcl.clip_loss(q, k, scale, backend=backend),
        "siglip": lambda: fastcl.siglip_loss(q, k, scale, bias, backend=backend),
    }


def host_report(backend: str = "cpu", steps: int = 300, rounds: int = 7) -> List[Dict]:
    """Rows ``{"loss", "backend", "eager_us", "custom_op_us", "ratio"}``: microseconds per
    forward + backward step (best round) with the eager path and with the custom op forced."""
    torch.set_num_threads(1)
    rows = []
    for loss, fn in _losses(backend).items():
        best = {"eager": float("inf"), "custom_op": float("inf")}
        for _ in range(rounds):
            for mode in best:
                force_custom_op(mode == "custom_op")
                try:
                    for _ in range(steps // 10):  # warm-up of this mode's path
                        fn().backward()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        fn().backward()
                    best[mode] = min(best[mode], (time.perf_counter() - t0) / steps * 1e6)
                finally:
                    force_custom_op(False)
        rows.append({"loss": loss, "backend": backend, "eager_us": best["eager"], "custom_op_us": best["custom_op"],
                     "ratio": best["custom_op"] / best["eager"]})
    return rows


def main(argv=None):
    from fastcl.cli import _positive_int
    from fastcl.ops.dispatch import BACKENDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cpu", choices=BACKENDS)
    p.add_argument("--steps", type=_positive_int, default=300)
    p.add_argument("--rounds", type=_positive_int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = host_report(a.backend, a.steps, a.rounds)
    for r in rows:
        print(f"{r['loss']:<8} {r['backend']:<6} eager {r['eager_us']:8.1f} us   custom op {r['custom_op_us']:8.1f} us"
              f"   {r['ratio']:.2f}x")
    if a.json:
        from fastcl.profiling import source_commit
        meta = {"torch": torch.__version__, "commit": source_commit(), "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(["python", *sys.argv])}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
