"""Train a toy CLIP model with negatives from every rank: torchrun + DDP + fastcl.nn.ClipLoss.

    # one node, 4 CPU processes (gloo)
    torchrun --standalone --nproc-per-node 4 examples/distributed_clip.py --dist-impl ring
    # one node, all its GPUs (NCCL)
    torchrun --standalone --nproc-per-node gpu examples/distributed_clip.py --device cuda
    # two nodes, 8 GPUs each: run on every node, with the first node's address
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 examples/distributed_clip.py --device cuda

Also runs as a plain single process (``python examples/distributed_clip.py``).  Each rank draws
its own synthetic (image, text) pairs; the loss sees local rows against every rank's columns
(open_clip's ``local_loss=True, gather_with_grad=True``), and DDP averages the gradients, which
then equal those of one process computing the loss of the global batch.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastcl.nn


class TwoTower(nn.Module):
    """(B, 64) 'images' and (B, 32) 'texts' to (B, D) unit embeddings, plus CLIP's logit scale."""

    def __init__(self, d: int):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, d))
        self.text = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, d))
        self.log_scale = nn.Parameter(torch.tensor(2.659))  # ln(1 / 0.07)

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.log_scale.clamp(max=4.6052).exp())  # scale clamped at 100, as open_clip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dist-impl", choices=("gather", "ring"), default="ring")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=256, help="per-rank batch size")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    for name in ("batch", "dim", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    torch.manual_seed(0)  # same initial weights on every rank
    model = TwoTower(args.dim).to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    loss_fn = fastcl.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                                 dist_impl=args.dist_impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Synthetic paired data: the text is a fixed linear view of the image plus noise.
    gen = torch.Generator().manual_seed(1000 + rank)
    mix = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        images = torch.randn(args.batch, 64, generator=gen)
        texts = images @ mix / 8 + 0.1 * torch.randn(args.batch, 32, generator=gen)
        img, txt, scale = model(images.to(device), texts.to(device))
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # collective with the ring: every rank runs it
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({world} rank(s), dist_impl={args.dist_impl}, "
                  f"global batch {args.batch * world})", flush=True)
    if distributed:
        # Free the DDP model (its reducer holds gloo work) and wait for every rank before the group
        # goes: torch's gloo teardown could otherwise hang a rank at exit now and then.
        del model, opt, loss_fn
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
