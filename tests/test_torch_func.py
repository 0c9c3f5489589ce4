"""torch.func transforms through the losses built on fastcl's own autograd Functions (the teacher
weights of distillation, the PML-form row blocks, the token cross-entropy, the cdist distances):
torch.func.grad, its nesting (a second derivative), vmap and vmap(grad) (per-sample gradients),
each against plain autograd, in float64.  The Functions used to refuse every transform (no
``setup_context``)."""
import pytest
import torch

import fastcl
from fastcl._ext import extension_available
from fastcl.nn import pml

BACKEND = "cpu" if extension_available() else None
N, D = 9, 5
TOL = dict(rtol=1e-9, atol=1e-11)
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0])
TOKENS = torch.tensor([[3, 1, 0], [4, 0, 0], [2, 2, 1]])  # 0 is padding
TEACHER = tuple(torch.randn(N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) for _ in range(2))
MINED = (torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([1, 2, 3, 4, 5, 2]))


def _scalar(x):
    return torch.tensor(x, dtype=torch.float64)


# name -> (loss of the differentiated tensors, their shapes and fixed values); every loss is 0-d
CASES = {
    "distill_clip_loss": (lambda i, t: sum(fastcl.distill_clip_loss(i, t, 2.0, *TEACHER, 3.0, backend=BACKEND)),
                          [(N, D), (N, D)]),
    "ntxent_loss_pml": (lambda e, t: fastcl.ntxent_loss_pml(e, LABELS, t), [(N, D), 0.5]),
    "ntxent_loss_pml ref_emb": (lambda e, r: fastcl.ntxent_loss_pml(e, LABELS, 0.3, ref_emb=r,
                                                                    ref_labels=LABELS.flip(0)), [(N, D), (N, D)]),
    "triplet_margin_loss_pml": (lambda e: fastcl.triplet_margin_loss_pml(e, LABELS, 0.4), [(N, D)]),
    # the mined path differentiates the cdist distances directly
    "triplet_margin_loss_pml mined": (lambda e: fastcl.triplet_margin_loss_pml(e, None, 0.4, indices_tuple=MINED),
                                      [(N, D)]),
    "ContrastiveLoss": (lambda e: pml.ContrastiveLoss(0.1, 0.9)(e, LABELS), [(N, D)]),
    "MultiSimilarityLoss": (lambda e: pml.MultiSimilarityLoss()(e, LABELS), [(N, D)]),
    "CircleLoss": (lambda e: pml.CircleLoss(gamma=8.0)(e, LABELS), [(N, D)]),
    "contrastive_loss_pml": (lambda e, a, b: fastcl.contrastive_loss_pml(e, LABELS, a, b), [(N, D), 0.1, 0.9]),
    "contrastive_loss_pml mined": (lambda e, a: fastcl.contrastive_loss_pml(e, None, a, 1.1, indices_tuple=MINED),
                                   [(N, D), 0.1]),
    "multi_similarity_loss_pml": (lambda e, a, b, c: fastcl.multi_similarity_loss_pml(e, LABELS, a, b, c),
                                  [(N, D), 2.0, 10.0, 0.4]),
    "circle_loss_pml": (lambda e, m, g: fastcl.circle_loss_pml(e, LABELS, m, g), [(N, D), 0.4, 8.0]),
    "caption_loss": (lambda x: fastcl.caption_loss(x, TOKENS), [(3, 3, D)]),
}


def _inputs(specs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64, generator=g) if isinstance(s, tuple) else _scalar(s) for s in specs]


def _autograd(fn, xs, create_graph=False):
    xs = [x.detach().requires_grad_() for x in xs]
    found = torch.autograd.grad(fn(*xs), xs, create_graph=create_graph, allow_unused=True)
    return xs, [torch.zeros_like(x) if g is None else g for x, g in zip(xs, found)]


def _penalty(grads):
    return sum((g * g).sum() for g in grads)


@pytest.mark.parametrize("name", CASES)
def test_grad_and_grad_of_grad_match_autograd(name):
    fn, specs = CASES[name]
    xs = _inputs(specs, 0)
    argnums = tuple(range(len(xs)))
    grads = torch.func.grad(fn, argnums=argnums)(*xs)
    want = _autograd(fn, xs)[1]
    for i, (got, ref) in enumerate(zip(grads, want)):
        torch.testing.assert_close(got, ref, **TOL, msg=f"{name} grad {i}")
    second = torch.func.grad(lambda *a: _penalty(torch.func.grad(fn, argnums=argnums)(*a)), argnums=argnums)(*xs)
    leaves, first = _autograd(fn, xs, create_graph=True)
    want = torch.autograd.grad(_penalty(first), leaves, allow_unused=True)
    for i, (got, ref, x) in enumerate(zip(second, want, xs)):
        torch.testing.assert_close(got, torch.zeros_like(x) if ref is None else ref, **TOL,
                                   msg=f"{name} grad of grad {i}")


@pytest.mark.parametrize("name", CASES)
def test_vmap_and_per_sample_grads_match_single_calls(name):
    """vmap over 3 samples of every differentiated tensor (the other arguments shared) equals single
    calls; vmap(grad) equals each sample's autograd gradient."""
    fn, specs = CASES[name]
    samples = [_inputs(specs, seed) for seed in (1, 2, 3)]
    stacked = [torch.stack(parts) for parts in zip(*samples)]
    argnums = tuple(range(len(stacked)))
    batched = torch.func.vmap(fn)(*stacked)
    torch.testing.assert_close(batched, torch.stack([fn(*xs) for xs in samples]), **TOL, msg=f"{name} vmap")
    per_sample = torch.func.vmap(torch.func.grad(fn, argnums=argnums))(*stacked)
    for b, xs in enumerate(samples):
        for i, ref in enumerate(_autograd(fn, xs)[1]):
            torch.testing.assert_close(per_sample[i][b], ref, **TOL, msg=f"{name} vmap(grad) sample {b} input {i}")
