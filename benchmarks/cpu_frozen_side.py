"""CLIP loss forward + backward on the cpu backend with both towers trainable, then with the text
tower frozen (LiT): the backward then forms no text gradient.

    python benchmarks/cpu_frozen_side.py [--n 4096] [--d 256] [--reps 5]
"""
import argparse
import time

import torch

import fastcl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    img, txt = torch.randn(args.n, args.d), torch.randn(args.n, args.d)

    def step(frozen_text: bool) -> float:
        a = img.clone().requires_grad_()
        b = txt.clone().requires_grad_(not frozen_text)
        t0 = time.perf_counter()
        fastcl.clip_loss(a, b, 14.3, backend="cpu").backward()
        return time.perf_counter() - t0

    for frozen in (False, True):
        step(frozen)  # warm-up
        times = sorted(step(frozen) for _ in range(args.reps))
        print(f"text frozen={frozen}: median {times[len(times) // 2] * 1e3:.1f} ms over {args.reps} "
              f"(fwd+bwd, N={args.n}, D={args.d}, fp32, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
