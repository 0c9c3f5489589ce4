"""The training loop: gradient caching, resume, metrics and configuration errors."""
import csv
import gc
import json
import random
import sys
import time

import pytest
import torch
from torch import nn

from conftest import AUTOCAST_BF16_FACTOR, TF32_FACTOR, TOL, assert_close, rel_err
from fastcl import clip_loss
from fastcl.losses.ntxent import ntxent_loss
from fastcl.models import ProjectionHead, SimCLR, TwoTower
from fastcl.train import Trainer, fit, step_seed


def _simclr(dropout=0.0, batch_norm=False, seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Dropout(dropout), nn.Linear(24, 16))
    return SimCLR(enc, ProjectionHead(16, 32, 8, batch_norm=batch_norm))


def _ntxent(z0, z1):
    return ntxent_loss(z0, z1, 0.3, backend="reference")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _step_grads(model, loss, inputs, chunk_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = Trainer(model, loss, opt, batch_size=inputs[0].shape[0], chunk_size=chunk_size, progress=False)
    model.train()
    model.zero_grad(set_to_none=True)
    value = trainer.compute_gradients(inputs)
    return value, _grads(model)


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_grad_cache_equals_unchunked_simclr(chunk_size):
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g))
    model = _simclr()
    loss_ref, ref = _step_grads(model, _ntxent, inputs, None)
    loss_c, got = _step_grads(model, _ntxent, inputs, chunk_size)
    assert_close(loss_c, loss_ref, torch.float32, "loss")
    for name in ref:
        assert_close(got[name], ref[name], torch.float32, name)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_grad_cache_bounds_the_rows_under_autograd(chunk_size):
    """Activation memory follows the rows the encoder sees with autograd on: with chunk_size
    that is at most chunk_size per forward, however large the batch; without it, the batch."""
    model = _simclr()
    seen = []
    model.encoder.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].shape[0], torch.is_grad_enabled())))
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g))
    _step_grads(model, _ntxent, inputs, chunk_size)
    with_grad = [rows for rows, grad in seen if grad]
    assert with_grad, "the encoder never ran with autograd"
    assert max(with_grad) == (24 if chunk_size is None else chunk_size)


def test_grad_cache_equals_unchunked_two_tower_with_batch_level_outputs():
    torch.manual_seed(0)
    model = TwoTower(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)), nn.Linear(7, 5), embed_dim=5,
                     init_logit_bias=-1.0)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(12, 6, generator=g), torch.randn(12, 7, generator=g))

    def loss(fi, ft, scale, bias):
        # The CLIP gradient of a constant bias is 0 up to rounding; the extra term makes it testable.
        return clip_loss(fi, ft, scale, bias, backend="reference") + 0.5 * (bias * scale) ** 2
    _, ref = _step_grads(model, loss, inputs, None)
    _, got = _step_grads(model, loss, inputs, 5)  # chunks 5, 5, 2
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name in ref:
        assert_close(got[name], ref[name], torch.float32, name)


def test_grad_cache_replays_dropout_under_saved_rng():
    # With dropout the chunked step must equal: the same chunks forwarded once each with grad
    # (same RNG draws), embeddings concatenated, one loss.  Without restoring the RNG before the
    # replay, the masks differ from those the loss saw and the gradients do not match.
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g))
    model = _simclr(dropout=0.5)
    model.train()
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    outs = [model(inputs[0][s:s + 4], inputs[1][s:s + 4]) for s in range(0, 12, 4)]
    _ntxent(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])).backward()
    ref = _grads(model)
    torch.manual_seed(123)
    _, got = _step_grads(model, _ntxent, inputs, 4)
    for name in ref:
        assert_close(got[name], ref[name], torch.float32, name)
    torch.manual_seed(124)  # negative control: other masks give other gradients, beyond any rounding
    _, other = _step_grads(model, _ntxent, inputs, 4)
    assert rel_err(other["encoder.0.weight"], ref["encoder.0.weight"]) > TOL[torch.bfloat16]  # measured 1.5


def test_grad_cache_updates_batchnorm_stats_once_per_chunk():
    g = torch.Generator().manual_seed(4)
    inputs = (torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g))
    model = _simclr(batch_norm=True)
    expected = _simclr(batch_norm=True)
    expected.train()
    with torch.no_grad():
        for s in range(0, 8, 4):
            expected(inputs[0][s:s + 4], inputs[1][s:s + 4])
    _step_grads(model, _ntxent, inputs, 4)
    for (name, a), (_, b) in zip(model.named_buffers(), expected.named_buffers()):
        assert torch.equal(a, b), name


def _noise_views(batch, gen):
    (x,) = batch
    return x + 0.1 * torch.randn(x.shape, generator=gen), x + 0.1 * torch.randn(x.shape, generator=gen)


def _run(tmp_path, epochs, *, resume=None, max_steps=None, seed_model=0, chunk_size=4, metrics="m.jsonl"):
    model = _simclr(dropout=0.2, seed=seed_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    trainer = Trainer(model, _ntxent, opt, batch_size=8, chunk_size=chunk_size, transform=_noise_views,
                      scheduler=sched, seed=7, progress=False, checkpoint_path=str(tmp_path / "ck.pt"),
                      metrics_path=str(tmp_path / metrics))
    data = torch.randn(27, 10, generator=torch.Generator().manual_seed(5))  # 3 steps per epoch
    history = trainer.fit(data, epochs, resume=resume, max_steps=max_steps)
    return model, opt, history


def test_resume_is_bit_identical_on_cpu(tmp_path):
    full_model, full_opt, full_hist = _run(tmp_path / "a", 3)
    _run(tmp_path / "b", 3, max_steps=4)  # stops mid-epoch 2 and checkpoints
    resumed, opt, hist = _run(tmp_path / "b", 3, resume=str(tmp_path / "b" / "ck.pt"), seed_model=99)
    assert [r["step"] for r in hist] == [5, 6, 7, 8, 9]
    assert [r["loss"] for r in hist] == [r["loss"] for r in full_hist[4:]]
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
    lines = (tmp_path / "b" / "m.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == list(range(1, 10))


def test_metrics_log_the_rate_each_step_used(tmp_path):
    """The scheduler steps after the optimizer: a step's record holds the rate that step ran at
    (it used to hold the next step's, and the last record a rate past the schedule's end)."""
    model = _simclr()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=6, pct_start=0.1)
    expected = []
    probe = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3),
                                                max_lr=3e-3, total_steps=6, pct_start=0.1)
    for _ in range(6):
        expected.append(probe.optimizer.param_groups[0]["lr"])
        probe.optimizer.step()
        probe.step()
    trainer = Trainer(model, _ntxent, opt, batch_size=8, transform=_noise_views, scheduler=sched, seed=1,
                      progress=False)
    hist = trainer.fit(torch.randn(24, 10), 2)
    assert [r["lr"] for r in hist] == expected and len(set(expected)) > 1


def test_schedule_length_counts_each_process_share():
    """The demo's LR schedule spans the steps each process takes: (n // world) // batch an epoch."""
    from fastcl.demo import schedule_steps
    assert schedule_steps(96, 2, 16, world_size=1) == 12
    assert schedule_steps(96, 2, 16, world_size=2) == 6
    assert schedule_steps(97, 1, 16, world_size=2) == 3  # 48 rows each: the odd one is left over


def test_step_seeds_differ_by_rank_and_step():
    seeds = {(r, k): step_seed(7, r, k) for r in range(8) for k in range(200)}
    assert len(set(seeds.values())) == len(seeds)  # no two ranks or steps share a stream
    assert all(0 <= s < 2**64 for s in seeds.values())
    assert step_seed(7, 1, 5) == seeds[(1, 5)] and step_seed(8, 1, 5) != seeds[(1, 5)]
    assert step_seed(2**63 - 1, 3, 10**9) < 2**64  # the CLI's largest --seed
    torch.manual_seed(step_seed(2**63 - 1, 3, 10**9))  # accepted by torch


def test_every_step_reseeds_its_streams(tmp_path):
    """Each step's transform generator, torch's and Python's global RNGs start from
    step_seed(seed, rank, step): what a resumed run and every rank rely on."""
    draws = []

    def record(batch, gen):
        draws.append((torch.randn(3, generator=gen), torch.rand(3), random.random()))
        (x,) = batch
        return x, x + 0.1
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, seed=11,
                      transform=record, progress=False)
    trainer.fit(torch.randn(24, 10), 2)
    assert len(draws) == 6
    for step, (g_draw, t_draw, p_draw) in enumerate(draws):
        s = step_seed(11, 0, step)
        assert torch.equal(g_draw, torch.randn(3, generator=torch.Generator().manual_seed(s)))
        torch.manual_seed(s)
        assert torch.equal(t_draw, torch.rand(3))
        random.seed(s)
        assert p_draw == random.random()


def test_resume_needs_same_number_of_processes(tmp_path):
    _run(tmp_path, 1)
    state = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert state["world_size"] == 1
    torch.save(dict(state, world_size=2), tmp_path / "two.pt")
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, seed=7,
                      progress=False)
    with pytest.raises(ValueError, match="written with world_size=2, but this trainer has world_size=1"):
        trainer.fit(torch.randn(27, 10), 2, resume=str(tmp_path / "two.pt"))


def test_resume_needs_same_batch_size(tmp_path):
    _run(tmp_path, 1)
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=4, seed=7,
                      progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.fit(torch.randn(27, 10), 2, resume=str(tmp_path / "ck.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        trainer.fit(torch.randn(27, 10), 2, resume=str(tmp_path / "missing.pt"))


def test_fit_trains_and_writes_csv_metrics(tmp_path):
    torch.manual_seed(0)
    model = _simclr()
    x = torch.randn(64, 10)
    hist = fit(model, _ntxent, x, torch.optim.Adam(model.parameters(), lr=1e-2), epochs=4, batch_size=16,
               transform=_noise_views, metrics_path=str(tmp_path / "m.csv"), progress=False)
    assert len(hist) == 16
    assert hist[-1]["loss"] < hist[0]["loss"]
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == 16 and float(rows[-1]["samples_per_s"]) > 0 and float(rows[-1]["peak_mem_mb"]) > 0


@pytest.mark.parametrize("tqdm", [True, False])
def test_progress_counts_to_max_steps_with_the_metrics_epoch(tqdm, tmp_path, capsys, monkeypatch):
    """The progress display ends at max_steps (not at the epochs' total) and numbers epochs from 0,
    as the metrics records do."""
    if tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the printed-lines fallback
    model = _simclr()
    fit(model, _ntxent, torch.randn(64, 10), torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=16,
        transform=_noise_views, max_steps=3, metrics_path=str(tmp_path / "m.jsonl"), progress=True, log_every=1)
    epochs = {json.loads(line)["epoch"] for line in open(tmp_path / "m.jsonl")}
    assert epochs == {0}
    err = capsys.readouterr().err
    if tqdm:
        assert "3/3" in err and "/8" not in err and "epoch=0" in err and "epoch=1" not in err
    else:
        assert "step 3/3 epoch 0 " in err and "/8" not in err and "epoch 1" not in err


def test_bf16_autocast_step_matches_fp32_and_steps():
    """precision="bf16" runs model and loss under bf16 autocast (the loss sees bf16 embeddings); the
    step's loss and gradients agree with an fp32 step up to that rounding, and differ from them;
    then the optimizer steps: every parameter moves by -lr times its gradient."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 10, generator=g)
    inputs = (x, x + 0.3 * torch.randn(16, 10, generator=g))  # two views of the same samples
    results = {}
    for precision in ("fp32", "bf16"):
        seen = []

        def loss_fn(z0, z1):
            seen.append(z0.dtype)
            return _ntxent(z0, z1)
        model = _simclr()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16, chunk_size=8,
                          precision=precision, progress=False)
        loss = trainer.train_step(inputs)
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        grads = _grads(model)
        for name, p in model.named_parameters():
            assert grads[name].abs().max() > 0, f"{precision}: no gradient for {name}"
            assert torch.equal(p.detach(), before[name].add(grads[name], alpha=-0.1)), f"{precision}: {name} did not step"
        results[precision] = torch.tensor(loss), grads
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert_close(loss16, loss32, torch.bfloat16, "bf16 step's loss")
    for name in grads32:
        assert_close(grads16[name], grads32[name], torch.bfloat16, f"bf16 step's gradient of {name}",
                     AUTOCAST_BF16_FACTOR)
    flat = lambda grads: torch.cat([t.flatten() for t in grads.values()])  # noqa: E731
    assert rel_err(flat(grads16), flat(grads32)) > TOL[torch.float32], "bf16 autocast rounded nothing"


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size=1), "batch_size"),
    (dict(batch_size=8, chunk_size=9), "chunk_size"),
    (dict(batch_size=8, chunk_size=0), "chunk_size"),
    (dict(batch_size=8, precision="fp16"), "precision"),
    (dict(batch_size=8, checkpoint_every=0), "checkpoint_every"),
    (dict(batch_size=8, seed=-1), "seed"),
    (dict(batch_size=8, seed=True), "seed"),
    (dict(batch_size=8, chunk_size=True), "chunk_size"),
    (dict(batch_size=8, log_every=0), "log_every"),
])
def test_bad_config_errors_name_the_argument(kwargs, name):
    model = _simclr()
    with pytest.raises(ValueError, match=name):
        Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_fit_arguments():
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.fit(torch.randn(5, 10), 1)
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit(torch.randn(16, 10), 0)
    with pytest.raises(ValueError, match=r"data\[1\]"):
        trainer.fit((torch.randn(16, 10), torch.randn(15, 10)), 1)
    with pytest.raises(TypeError, match="optimizer"):
        Trainer(model, _ntxent, "adam", batch_size=8)
    with pytest.raises(TypeError, match="loss_fn"):
        Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8)


def test_bad_types_and_shapes_name_the_argument():
    model = _simclr()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Trainer(lambda x: x, _ntxent, opt, batch_size=8)
    with pytest.raises(TypeError, match="transform must be callable"):
        Trainer(model, _ntxent, opt, batch_size=8, transform="flip")
    trainer = Trainer(model, _ntxent, opt, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="input 1 has 7"):
        trainer.compute_gradients((torch.randn(8, 10), torch.randn(7, 10)))
    per_row = Trainer(model, lambda z0, z1: (z0 * z1).sum(1), opt, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="loss_fn must return a 0-d tensor"):
        per_row.compute_gradients((torch.randn(8, 10), torch.randn(8, 10)))


def test_ddp_wrapping_with_grad_cache_single_process(tmp_path):
    # torchrun path on one CPU process (gloo): the model is wrapped in DDP, replay chunks skip the
    # all-reduce except the last, and the gradients still equal the plain unchunked step.
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    g = torch.Generator().manual_seed(6)
    inputs = (torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g))
    _, ref = _step_grads(_simclr(), _ntxent, inputs, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _simclr()
        trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=12,
                          chunk_size=5, progress=False)
        assert isinstance(trainer.model, nn.parallel.DistributedDataParallel) and trainer.module is model
        reductions = []

        def count(state, bucket):  # DDP's all-reduce of a gradient bucket (one: a small model)
            reductions.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        trainer.model.register_comm_hook(None, count)
        model.zero_grad(set_to_none=True)
        trainer.compute_gradients(inputs)
        assert reductions == [0], "one all-reduce, on the last of the 3 chunks' backwards"
        for name, p in model.named_parameters():
            assert_close(p.grad, ref[name], torch.float32, name)
    finally:
        # Gloo's worker thread frees its last all-reduce work after the work completes, and that
        # needs the GIL.  If the DDP reducer (which holds the process group) were freed first, the
        # group's destructor would join that thread while holding the GIL: a deadlock (seen once
        # in CI).  Sleeping releases the GIL; then the DDP objects go before the group.
        time.sleep(0.2)
        trainer = model = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_cache_on_gpu(precision):
    g = torch.Generator().manual_seed(8)
    inputs = tuple(torch.randn(64, 10, generator=g).cuda() for _ in range(2))

    def loss(z0, z1):
        return ntxent_loss(z0, z1, 0.3)
    ref_model, model = _simclr().cuda(), _simclr().cuda()
    for m, chunk in ((ref_model, None), (model, 16)):
        trainer = Trainer(m, loss, torch.optim.SGD(m.parameters(), lr=0.0), batch_size=64, chunk_size=chunk,
                          precision=precision, progress=False)
        m.zero_grad(set_to_none=True)
        value = trainer.compute_gradients(inputs)
        assert torch.isfinite(value)
    # Both runs on the GPU, chunked against whole: TF32 model matmuls round differently per chunk
    # (fp32), and a bf16 autocast model rounds its activations (bf16): a few times the table's.
    dtype, factor = (torch.float32, TF32_FACTOR) if precision == "fp32" else (torch.bfloat16, AUTOCAST_BF16_FACTOR)
    for (name, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert_close(a.grad, b.grad, dtype, name, factor)


def test_checkpoints_of_an_earlier_fastcl_still_resume(tmp_path):
    """A checkpoint written before the per-step reseeding holds RNG states and no world_size: the
    Trainer and `fastcl train --resume`'s check read it as one of this run's process count."""
    from fastcl.train import upgrade_checkpoint
    _run(tmp_path, 1)
    state = torch.load(tmp_path / "ck.pt", weights_only=False)
    old = {k: v for k, v in state.items() if k != "world_size"}
    old.update(torch_rng=torch.get_rng_state(), cuda_rng=None, generator=torch.Generator().get_state(),
               python_rng=random.getstate())
    torch.save(old, tmp_path / "old.pt")
    upgraded = upgrade_checkpoint(old, 3)
    assert set(upgraded) == set(state) and upgraded["world_size"] == 3
    assert upgrade_checkpoint(state, 3) is state  # today's form: untouched
    model, opt, hist = _run(tmp_path, 2, resume=str(tmp_path / "old.pt"))
    assert [r["step"] for r in hist] == [4, 5, 6]
    broken = {k: v for k, v in old.items() if k != "generator"}  # neither form: refused by name
    with pytest.raises(ValueError, match=r"missing \['world_size'\]"):
        Trainer(model, _ntxent, opt, batch_size=8, seed=7, progress=False).load_state_dict(broken)


def test_data_fingerprint_tells_data_apart():
    """fit's DDP check compares it across ranks: the same data agrees, any other differs."""
    from fastcl.train import data_fingerprint
    x = torch.randn(40, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(40)
    same = data_fingerprint([x.clone(), labels.clone()])
    assert data_fingerprint([x, labels]) == same
    for other in ([x + 1, labels], [x, labels.flip(0)], [x[:39], labels[:39]], [x.double(), labels],
                  [x.reshape(40, 2, 5), labels]):
        assert data_fingerprint(other) != same
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert data_fingerprint([nan]) == data_fingerprint([nan.clone()])  # NaN equals itself here
    assert data_fingerprint([torch.empty(0, 3)]) == data_fingerprint([torch.empty(0, 3)])


def test_train_step_starts_from_zero_gradients_in_train_mode():
    """Each step's gradients are its own (not accumulated over steps), computed in train mode
    even after an evaluation left the model in eval mode."""
    g = torch.Generator().manual_seed(9)
    inputs = (torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g))
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=8, progress=False)
    trainer.train_step(inputs)
    first = _grads(model)
    model.eval()
    trainer.train_step(inputs)
    assert model.training
    for name, grad in _grads(model).items():
        assert torch.equal(grad, first[name]), name


def test_resume_needs_same_seed():
    model = _simclr()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = Trainer(model, _ntxent, opt, batch_size=8, seed=7, progress=False).state_dict()
    with pytest.raises(ValueError, match="written with seed=7, but this trainer has seed=8"):
        Trainer(model, _ntxent, opt, batch_size=8, seed=8, progress=False).load_state_dict(state)


def test_each_epoch_takes_every_row_once_in_its_own_order():
    seen = []

    def record(batch, gen):
        (x,) = batch
        seen.append(x[:, 0].long().tolist())
        return x, x + 0.1
    data = torch.randn(24, 10)
    data[:, 0] = torch.arange(24)
    model = _simclr()
    Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=8, seed=3, transform=record,
            progress=False).fit(data, 2)
    epochs = [sum(seen[:3], []), sum(seen[3:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]


def test_checkpoints_every_n_steps_and_at_the_end_of_an_epoch(monkeypatch):
    model = _simclr()
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=8,
                      transform=_noise_views, checkpoint_path="unused.pt", checkpoint_every=2, progress=False)
    saved = []
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path: saved.append(trainer.global_step))
    trainer.fit(torch.randn(40, 10), 1)  # 5 steps
    assert saved == [2, 4, 5]


def test_fit_passes_chunking_and_precision_and_counts_samples():
    """fit's chunk_size and precision reach the Trainer; samples_per_s counts batch_size samples
    per step (the record's rate times its elapsed time)."""
    model = _simclr()
    rows, dtypes = [], []
    model.encoder.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))

    def loss(z0, z1):
        dtypes.append(z0.dtype)
        return _ntxent(z0, z1)
    hist = fit(model, loss, torch.randn(16, 10), torch.optim.SGD(model.parameters(), lr=0.0), epochs=1,
               batch_size=8, chunk_size=4, precision="bf16", transform=_noise_views, progress=False)
    assert max(rows) == 4 and dtypes == [torch.bfloat16] * 2
    for r in hist:
        assert r["samples_per_s"] * r["elapsed_s"] == pytest.approx(8 * r["step"], rel=1e-9)


def test_resumed_csv_metrics_keep_one_header(tmp_path):
    def run(**kw):
        model = _simclr()
        trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8,
                          transform=_noise_views, checkpoint_path=str(tmp_path / "ck.pt"),
                          metrics_path=str(tmp_path / "m.csv"), progress=False)
        trainer.fit(torch.randn(24, 10, generator=torch.Generator().manual_seed(2)), 1, **kw)
    run(max_steps=2)
    run(resume=str(tmp_path / "ck.pt"))
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,") and sum(line.startswith("epoch,") for line in lines) == 1
    assert [int(r["step"]) for r in csv.DictReader(lines)] == [1, 2, 3]


def test_resume_restores_the_scheduler_mid_period(tmp_path):
    """A run split at step 3 of StepLR(step_size=2) takes the full run's rates: the scheduler's
    own count is restored (the optimizer's rate alone would shift the decays by a step)."""
    def run(**kw):
        model = _simclr()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = Trainer(model, _ntxent, opt, batch_size=8, transform=_noise_views, progress=False,
                          scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                          checkpoint_path=str(tmp_path / "ck.pt"))
        return [r["lr"] for r in trainer.fit(torch.randn(24, 10), 2, **kw)]
    full = run()
    assert run(max_steps=3) == full[:3]
    assert run(resume=str(tmp_path / "ck.pt")) == full[3:]


def test_model_may_return_a_list_and_checkpoints_make_their_directory(tmp_path):
    class ListOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _simclr()

        def forward(self, x0, x1):
            return list(self.inner(x0, x1))
    model = ListOut()
    path = tmp_path / "new" / "dir" / "ck.pt"
    trainer = Trainer(model, _ntxent, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8,
                      transform=_noise_views, checkpoint_path=str(path), progress=False)
    trainer.fit(torch.randn(8, 10), 1)
    assert torch.load(path, weights_only=False)["global_step"] == 1
