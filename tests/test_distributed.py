"""Distributed losses on CPU (gloo): one spawn per world size, every check inside it.

The checks themselves live in ``_dist_worker.py`` (spawned processes import it by name).  Each
rank writes its passed/failed checks to a JSON file; the parent joins with a timeout and kills
the ranks if any hangs, so a deadlock fails the test instead of blocking the suite.
"""
import importlib.util
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker  # noqa: E402
from conftest import TOL  # noqa: E402

JOIN_TIMEOUT_S = 120
# Checks every rank must report (subgroup checks run only on the subgroup's members).
EXPECTED = ["clip gather local_loss=True", "clip scale grads per rank", "coca module gather", "clip ring local_loss=False", "clip module ring bias+smoothing",
            "clip gather_with_grad=False",
            "clip ring reference backend", "siglip ring reference backend", "siglip gather", "siglip ring", "siglip bidir", "ntxent gather",
            "ntxent ring", "supcon ring labels=True mode=all", "supcon gather labels=False mode=all",
            "supcon ring labels=True mode=one", "uneven clip gather", "uneven clip ring", "uneven ntxent gather",
            "uneven supcon gather", "all_gather_with_grad", "D mismatch all_gather", "D mismatch clip gather",
            "D mismatch clip ring", "dtype mismatch ntxent", "local error published",
            "dcl gather union", "dcl gather separate", "dcl ring union", "dcl ring separate",
            "uneven dcl gather union", "uneven dcl gather separate", "uneven dcl ring union",
            "uneven dcl ring separate", "D mismatch dcl gather", "D mismatch dcl ring",
            "dcl negatives error published gather", "dcl negatives error published ring",
            "dcl weight_fn error published",
            "scale differs clip gather", "scale differs clip ring", "scale tensor differs siglip gather",
            "scale tensor differs siglip ring", "bias differs clip gather", "bias differs clip ring",
            "temperature differs ntxent gather", "temperature differs ntxent ring", "negatives differ dcl gather",
            "negatives differ dcl ring", "contrast_mode differs supcon gather", "contrast_mode differs supcon ring",
            "dist_impl differs clip", "local_loss differs clip ring", "gather_with_grad differs clip",
            "label_smoothing differs clip ring", "siglip aliases agree", "label_smoothing error published",
            "ring without gather_with_grad published", "bad dist_impl published",
            "unusable backend published gather", "unusable backend published ring", "SupConLoss mask published",
            "all_gather non-tensor published", "all_reduce shape differs", "ClipLoss rank argument published",
            "ring refuses device tensors on gloo", "all_reduce 6-D", "flag given as a tensor differs",
            "equal settings of different types agree", "scale on another device published", "unencodable setting published",
            "create_graph refused across ranks", "SupConLoss misplaced ref_emb published",
            "empty shard raises on every rank", "per rank clip gather_with_grad=False local_loss=False"]
EXPECTED += [f"per rank {loss} {impl}{flag}" for impl in ("gather", "ring")
             for loss, flag in (("clip", " local_loss=True"), ("clip", " local_loss=False smoothing"), ("siglip", ""))]
if importlib.util.find_spec("pytorch_metric_learning") is not None:  # fastcl.nn.pml.DistributedLossWrapper vs PML's
    EXPECTED += ([f"pml wrapper {n} efficient={e}" for n in _dist_worker.PML_WRAPPED for e in (False, True)]
                 + [f"pml wrapper references efficient={e}" for e in (False, True)]
                 + ["pml wrapper efficient batch of one", "pml wrapper cross batch memory", "pml wrapper uneven batches", "pml wrapper labels given on one rank",
                    "pml wrapper D mismatch", "pml wrapper local error published", "pml wrapper kind errors published"])


def _run(world, tmp_path, case="checks"):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker.worker, args=(r, world, str(tmp_path), case)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    # A rank that wrote its results finished every check; if it then hung, that was gloo's
    # teardown (see _dist_worker.worker), not fastcl.
    hung = [r for r in hung if not (tmp_path / f"rank{r}.json").exists()]
    assert not hung, f"ranks {hung} did not finish their checks within {JOIN_TIMEOUT_S}s (deadlock?)"
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results (exit code {procs[r].exitcode})"
        results.append(json.loads(path.read_text()))
    return results


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks: 24 s on 2 cores
def test_distributed_losses_match_global_batch(world, tmp_path):
    results = _run(world, tmp_path)
    failures = [f"rank {r}: {f}" for r, res in enumerate(results) for f in res["failures"]]
    assert not failures, "\n".join(failures)
    for r, res in enumerate(results):
        missing = [c for c in EXPECTED if c not in res["passed"]]
        assert not missing, f"rank {r} did not run {missing}"
    members = [r for r in range(world) if r % 2 == 1] if world >= 4 else list(range(world))
    for r in members:
        assert "subgroup clip ring" in results[r]["passed"] and "subgroup siglip gather" in results[r]["passed"]
    for r in set(range(world)) - set(members):
        assert "module outside its group raises" in results[r]["passed"]


# Checks of _dist_worker.mismatched_call_checks: ranks calling different operations all raise.
MISMATCHED_CALLS = ["different losses clip vs siglip gather", "different losses clip vs ntxent",
                    "different losses ClipLoss module vs ntxent ring", "different collectives all_gather vs all_reduce",
                    "different losses with a local error", "different losses of one argument count",
                    "argument names differ", "argument lists differ in length", "long argument lists",
                    "requires grad differs gather", "requires grad differs ring", "requires grad of a setting differs",
                    "requires grad differs all_reduce", "grad mode differs", "memory bank read on one rank"]


def test_ranks_calling_different_losses_all_raise(tmp_path):
    # Its own spawn: gloo used to abort a rank here, which would hide every other check.
    results = _run(2, tmp_path, "mismatched calls")
    failures = [f"rank {r}: {f}" for r, res in enumerate(results) for f in res["failures"]]
    assert not failures, "\n".join(failures)
    for r, res in enumerate(results):
        assert res["passed"] == MISMATCHED_CALLS, f"rank {r} passed only {res['passed']}"


def test_trainer_ranks_draw_apart_and_resume(tmp_path):
    """fastcl.train under DDP on two ranks (its own spawn)."""
    results = _run(2, tmp_path, "trainer")
    failures = [f"rank {r}: {f}" for r, res in enumerate(results) for f in res["failures"]]
    assert not failures, "\n".join(failures)
    for r, res in enumerate(results):
        assert res["passed"] == ["trainer ranks draw apart", "trainer resume under DDP", "trainer ranks disagree"], \
            f"rank {r}: {res['passed']}"


def _row_weight(x, y):
    return 1.0 + ((x - y) ** 2).sum(1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_one_process_ring_and_gather_equal_plain_losses(backend):
    # World size 1 without torch.distributed: the same ring code (no messages) and the gather
    # path reduce to the single-process losses, in value and gradient.
    import fastcl
    from fastcl.losses.distributed import (clip_loss_distributed, dcl_loss_distributed, ntxent_loss_distributed,
                                           siglip_loss_distributed, supcon_loss_distributed)
    if backend == "cpu" and not fastcl._ext.extension_available():
        pytest.skip("fastcl._C not built")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    cases = [
        (lambda x, y, impl: clip_loss_distributed(x, y, 3.0, 0.5, dist_impl=impl, backend=backend),
         lambda x, y: fastcl.clip_loss(x, y, 3.0, 0.5)),
        (lambda x, y, impl: siglip_loss_distributed(x, y, 3.0, -1.0, dist_impl=impl, backend=backend),
         lambda x, y: fastcl.siglip_loss(x, y, 3.0, -1.0)),
        (lambda x, y, impl: ntxent_loss_distributed(x, y, 0.4, dist_impl=impl, backend=backend),
         lambda x, y: fastcl.ntxent_loss(x, y, 0.4)),
        (lambda x, y, impl: supcon_loss_distributed(torch.stack([x, y], 1), labels, 0.2, dist_impl=impl,
                                                    backend=backend),
         lambda x, y: fastcl.supcon_loss(torch.stack([x, y], 1), labels, None, 0.2)),
        (lambda x, y, impl: dcl_loss_distributed(x, y, 0.3, _row_weight, dist_impl=impl, backend=backend),
         lambda x, y: fastcl.dcl_loss(x, y, 0.3, _row_weight)),
        (lambda x, y, impl: dcl_loss_distributed(x, y, 0.3, negatives="separate", dist_impl=impl, backend=backend),
         lambda x, y: fastcl.dcl_loss(x, y, 0.3, negatives="separate")),
    ]
    for fn, ref_fn in cases:
        x0, y0 = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = ref_fn(x0, y0)
        ref.backward()
        for impl in ("gather", "ring"):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            out = fn(x, y, impl)
            out.backward()
            assert _dist_worker.rel_err(out, ref) <= TOL[torch.float32], impl
            assert _dist_worker.rel_err(x.grad, x0.grad) <= TOL[torch.float32], impl
            assert _dist_worker.rel_err(y.grad, y0.grad) <= TOL[torch.float32], impl


def test_bad_dist_impl_and_ring_without_gradient_gather():
    from fastcl.losses.distributed import clip_loss_distributed, siglip_loss_distributed
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        clip_loss_distributed(x, x, 1.0, dist_impl="bidir")  # SigLIP's alias only
    with pytest.raises(ValueError, match="gather_with_grad"):
        clip_loss_distributed(x, x, 1.0, dist_impl="ring", gather_with_grad=False)
    with pytest.raises(ValueError, match="logit_scale"):
        siglip_loss_distributed(x, x, -1.0, 0.0)
