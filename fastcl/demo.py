"""The ``fastcl train`` demo: SimCLR on scikit-learn's bundled 8x8 handwritten digits, then a probe.

Everything runs on the CPU in a few minutes: 1,797 images ship inside scikit-learn (no download).
The score is a few-label linear probe on held-out images, next to the same probe on raw pixels
and on the untrained encoder, so the gain from contrastive pre-training is visible.
"""
import math
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastcl.models import ProjectionHead, SimCLR
from fastcl.train import Trainer, epoch_steps

LOSSES = ("ntxent", "supcon", "clip")


def load_digits_split(test_fraction: float = 0.3, seed: int = 0):
    """Stratified split of the digits: (x_train (N,1,8,8) float32 in [0,1], y_train (N,) int64, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the demo needs scikit-learn: pip install 'fastcl[demo]' "
                           "(or pip install scikit-learn)") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[:round(len(idx) * test_fraction)]] = True
    return x[~test], y[~test], x[test], y[test]


def augment(x: torch.Tensor, generator: torch.Generator, *, max_shift: float = 0.75, min_scale: float = 0.85,
            max_rotate: float = 15.0, noise: float = 0.1, drop: float = 0.15) -> torch.Tensor:
    """One random view of each image.

    A per-sample affine warp gives random shifts (up to ``max_shift`` pixels), crops (zoom into a
    window of ``min_scale``..1 of the side, resized back) and small rotations; then Gaussian
    noise and dropout of a fraction ``drop`` of the pixels.

    x: (B, 1, 8, 8) float32 in [0, 1] -> (B, 1, 8, 8) float32.
    """
    b, _, h, w = x.shape

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    scale = u(min_scale, 1.0)  # < 1 zooms in: a crop of that fraction of the side
    angle = u(-max_rotate, max_rotate) * math.pi / 180
    tx, ty = u(-max_shift, max_shift) * 2 / w, u(-max_shift, max_shift) * 2 / h
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    v = v + noise * torch.randn(v.shape, generator=generator)
    keep = torch.rand(v.shape, generator=generator) >= drop
    return (v * keep).clamp_(0.0, 1.0)


class DigitsCNN(nn.Module):
    """Small CNN encoder: (B, 1, 8, 8) float32 -> (B, width * 4) float32 features."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsMLP(nn.Module):
    """Small MLP encoder: (B, 1, 8, 8) float32 -> (B, width) float32 features."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        )
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ENCODERS = {"cnn": DigitsCNN, "mlp": DigitsMLP}


def make_loss(name: str, temperature: float, backend: Optional[str]):
    """Two-view loss ``loss(z0 (B,D), z1 (B,D)) -> 0-d`` for ``name`` in LOSSES.

    Under torch.distributed (more than one rank) the negatives come from every rank, through
    the all-gather versions in ``fastcl.losses.distributed``.
    """
    d = torch.distributed
    multi = d.is_available() and d.is_initialized() and d.get_world_size() > 1
    if name == "ntxent":
        from fastcl.losses.distributed import ntxent_loss_distributed
        from fastcl.losses.ntxent import ntxent_loss
        fn = ntxent_loss_distributed if multi else ntxent_loss
        return lambda z0, z1: fn(z0, z1, temperature, backend=backend)
    if name == "supcon":
        # No labels: SupCon reduces to the SimCLR objective over the [B, 2, D] views.
        from fastcl.losses.distributed import supcon_loss_distributed
        from fastcl.losses.supcon import supcon_loss
        fn = supcon_loss_distributed if multi else supcon_loss
        return lambda z0, z1: fn(torch.stack([z0, z1], 1), temperature=temperature,
                                 base_temperature=temperature, backend=backend)
    if name == "clip":
        from fastcl.losses import clip_loss
        from fastcl.losses.distributed import clip_loss_distributed
        fn = clip_loss_distributed if multi else clip_loss
        return lambda z0, z1: fn(z0, z1, 1.0 / temperature, backend=backend)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


@torch.no_grad()
def features(fn, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """fn applied in eval batches: x (N, ...) -> (N, F) float32 on the CPU."""
    return torch.cat([fn(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])


def linear_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                 *, shots: int = 5, repeats: int = 10, seed: int = 0) -> Dict[str, float]:
    """Logistic-regression accuracy with ``shots`` labelled training images per class.

    f_*: (N, F) float32 features; y_*: (N,) int64 labels.  Averaged over ``repeats`` random draws
    of the labelled images; returns {"mean": ..., "std": ...} accuracies in [0, 1].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    # Standardise with statistics of all training images: they are unlabelled data the
    # self-supervised model saw anyway; only the classifier is limited to the few labels.
    scaler = StandardScaler().fit(f_train.numpy())
    a_train, a_test = scaler.transform(f_train.numpy()), scaler.transform(f_test.numpy())
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(repeats):
        picks = []
        for c in range(int(y_train.max()) + 1):
            idx = (y_train == c).nonzero().flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
        pick = torch.cat(picks)
        clf = LogisticRegression(max_iter=2000, C=1.0)
        clf.fit(a_train[pick.numpy()], y_train[pick].numpy())
        accs.append(float((clf.predict(a_test) == y_test.numpy()).mean()))
    t = torch.tensor(accs)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(accs) > 1 else 0.0}


def schedule_steps(n_train: int, epochs: int, batch_size: int, world_size: Optional[int] = None) -> int:
    """Optimizer steps of a run (the LR schedule's length): each of ``world_size`` processes
    (default: torch.distributed's group, else 1) takes ``(n_train // world_size) // batch_size``
    steps an epoch, as ``Trainer.fit`` does (``fastcl.train.epoch_steps``)."""
    if world_size is None:
        d = torch.distributed
        world_size = d.get_world_size() if d.is_available() and d.is_initialized() else 1
    return epochs * epoch_steps(n_train, world_size, batch_size)


def run(*, loss: str = "ntxent", epochs: int = 320, batch_size: int = 256, chunk_size: Optional[int] = None,
        device: str = "cpu", backend: Optional[str] = None, seed: int = 0, out: Optional[str] = None,
        lr: float = 3e-3, temperature: float = 0.5, encoder: str = "cnn", width: Optional[int] = None,
        limit: Optional[int] = None,
        probe_repeats: int = 10, progress: bool = True, max_steps: Optional[int] = None,
        precision: str = "fp32", log=print, probe: bool = True, resume: Optional[str] = None) -> Dict[str, float]:
    """Train SimCLR on the digits and print the probe table; returns the accuracies.

    ``limit`` keeps only the first ``limit`` training images (for quick tests).  ``probe=False``
    skips the linear probes (their accuracies are NaN): the other ranks of a torchrun job.
    ``resume`` continues from a checkpoint written under ``out`` (``checkpoint.pt``).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=seed)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    dev = torch.device(device)
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {tuple(ENCODERS)}, got {encoder!r}")
    encoder = ENCODERS[encoder]() if width is None else ENCODERS[encoder](width)
    model = SimCLR(encoder, ProjectionHead(encoder.out_dim, 256, 64, batch_norm=True)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = schedule_steps(len(x_tr), epochs, batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1) \
        if steps > 1 else None

    def embed(x):
        model.eval()
        return model.embed(x.to(dev))

    def probe_of(train_and_test):  # () -> (train features, held-out features)
        if not probe:
            return {"mean": float("nan"), "std": float("nan")}
        xa, xb = train_and_test()
        return linear_probe(xa, y_tr, xb, y_te, repeats=probe_repeats, seed=seed)

    untrained = probe_of(lambda: (features(embed, x_tr), features(embed, x_te)))
    raw = probe_of(lambda: (x_tr.flatten(1), x_te.flatten(1)))

    def two_views(batch, g):
        (x,) = batch
        return augment(x, g), augment(x, g)

    metrics = ckpt = None
    if out is not None:
        import os
        os.makedirs(out, exist_ok=True)
        metrics, ckpt = os.path.join(out, "metrics.jsonl"), os.path.join(out, "checkpoint.pt")
    trainer = Trainer(model, make_loss(loss, temperature, backend), opt, batch_size=batch_size,
                      chunk_size=chunk_size, device=dev, transform=two_views, scheduler=sched, seed=seed,
                      metrics_path=metrics, checkpoint_path=ckpt, progress=progress, precision=precision)
    t0 = time.perf_counter()
    history = trainer.fit(x_tr, epochs, max_steps=max_steps, resume=resume)
    train_s = time.perf_counter() - t0
    trained = probe_of(lambda: (features(embed, x_tr), features(embed, x_te)))
    n_test = len(y_te)
    final_loss = history[-1]["loss"] if history else float("nan")  # a resumed, finished run takes no step
    log(f"\nSimCLR ({loss}) on sklearn digits: {len(x_tr)} train / {n_test} held-out images, "
        f"{len(history)} steps in {train_s:.1f}s, final loss {final_loss:.4f}")
    log(f"5-labels-per-class linear probe on held-out images (mean +- std over {probe_repeats} draws):")
    for name, acc in (("raw pixels", raw), ("untrained encoder", untrained), ("trained encoder", trained)):
        log(f"  {name:<18} {100 * acc['mean']:6.2f}% +- {100 * acc['std']:.2f}")
    return {"raw": raw["mean"], "untrained": untrained["mean"], "trained": trained["mean"],
            "train_s": train_s, "steps": len(history), "final_loss": final_loss}
