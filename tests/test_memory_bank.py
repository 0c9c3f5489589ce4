"""NT-Xent with a memory bank (lightly's MoCo form) against a float64 oracle, and the bank's
first-in first-out rule step by step."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import (DTYPES, NORMALISED_SCALAR_GRAD_FACTOR, NORMALISED_VALUE_FACTOR, assert_close, fp32_output_tol,
                      randn)
from fastcl._ext import extension_available
from fastcl.losses.ntxent import ntxent_bank_loss
from fastcl.nn import NTXentLoss
from fastcl.nn.memory_bank import MemoryBank
from fastcl.ops.dispatch import triton_available

BACKENDS = ["reference"] + (["cpu"] if extension_available() else []) + (["triton"] if triton_available() else [])
N, D, K = 37, 40, 67


def o_bank_ntxent(out0, out1, bank, t):
    """lightly: logits [out0_i . out1_i, out0_i . bank_j] / t, cross-entropy with target 0."""
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.T], 1) / t
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bank_loss_matches_the_oracle(backend, dtype):
    g = torch.Generator().manual_seed(1)
    out0, out1 = randn(N, D, dtype=dtype, generator=g), randn(N, D, dtype=dtype, generator=g)
    bank = F.normalize(randn(K, D, generator=g), dim=1)
    t = torch.tensor(0.2, requires_grad=True)
    leaves = [out0.clone().requires_grad_(), out1.clone().requires_grad_(), t]
    loss = ntxent_bank_loss(leaves[0], leaves[1], bank, leaves[2], backend=backend)
    refs = [x.detach().double().requires_grad_() for x in leaves]
    ref = o_bank_ntxent(refs[0], refs[1], bank.to(dtype).double(), refs[2])
    # The loss normalises the outputs in their dtype: its fp32 value and temperature gradient take
    # fp32_output_tol's row widened for that (the input dtype's for the gradient the fused
    # kernels sum from rounded gradient tiles), the output gradients their dtype's.
    assert_close(loss, ref, fp32_output_tol(dtype), "loss", NORMALISED_VALUE_FACTOR.get(dtype, 1.0))
    dout0, dout1, dtemp = torch.autograd.grad(loss, leaves)
    rout0, rout1, rtemp = torch.autograd.grad(ref, refs)
    assert_close(dout0, rout0, dtype, "dout0", elementwise=True)
    assert_close(dout1, rout1, dtype, "dout1", elementwise=True)
    row = fp32_output_tol(dtype, backend, from_tiles=True)
    assert_close(dtemp, rtemp, row, "dtemperature",
                 NORMALISED_SCALAR_GRAD_FACTOR.get(dtype, 1.0) if row == torch.float32 else 1.0)


def test_bank_loss_arguments():
    out0, out1 = torch.randn(5, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="negatives"):
        ntxent_bank_loss(out0, out1, torch.randn(4, 7))
    with pytest.raises(ValueError, match="negatives must be non-empty"):
        ntxent_bank_loss(out0, out1, torch.randn(0, 8))
    with pytest.raises(TypeError, match="negatives"):
        ntxent_bank_loss(out0, out1, torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=-1)
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=(4, 8, 2))
    with pytest.raises(TypeError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=2.5)
    # bools are ints to Python: True would be a bank of one row, (True, 8) one of 1 x 8
    with pytest.raises(TypeError, match="memory_bank_size must be an int"):
        NTXentLoss(memory_bank_size=True)
    with pytest.raises(ValueError, match="memory_bank_size must be a non-negative int"):
        NTXentLoss(memory_bank_size=(True, 8))
    crit = NTXentLoss(memory_bank_size=(4, 8))
    with pytest.raises(ValueError, match="dim 8"):
        crit(torch.randn(5, 6, requires_grad=True), torch.randn(5, 6))
    with pytest.raises(ValueError, match="dim 8"):  # a read without update (evaluation) checks too
        crit(torch.randn(5, 6), torch.randn(5, 6))
    # the bank is a buffer that moves with the module but is not saved (lightly's persistent=False)
    assert "memory_bank.bank" not in crit.state_dict() and crit.memory_bank.bank.shape == (4, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num, batch", [(11, 4), (8, 4)])
def test_module_steps_through_the_bank_as_lightly(backend, num, batch):
    """Starts from normalised randn rows drawn from the global generator at construction, uses
    the bank as it was before each call, then enqueues the normalised out1; a batch that reaches
    the end fills it and restarts at row 0, dropping its remaining rows (lightly's rule).  (8, 4)
    fills the bank exactly (ptr + batch == num), which restarts at row 0 too."""
    torch.manual_seed(123)
    crit = NTXentLoss(0.3, memory_bank_size=(num, D), backend=backend)
    torch.manual_seed(123)
    bank = F.normalize(torch.randn(num, D), dim=-1).double()
    assert torch.equal(crit.memory_bank.bank, bank.float())
    ptr = 0
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        out0, out1 = randn(batch, D, generator=g, requires_grad=True), randn(batch, D, generator=g)
        loss = crit(out0, out1)
        assert_close(loss, o_bank_ntxent(out0.detach().double(), out1.double(), bank, 0.3), torch.float32,
                     f"step {step}")
        rows = F.normalize(out1.double(), dim=1)
        if ptr + batch >= num:
            bank[ptr:] = rows[:num - ptr]
            ptr = 0
        else:
            bank[ptr:ptr + batch] = rows
            ptr += batch
        assert_close(crit.memory_bank.bank, bank, torch.float32, f"bank after step {step}")
        assert crit.memory_bank.ptr == ptr
    # evaluation (out0 without grad) reads the bank and leaves it as it is
    before = crit.memory_bank.bank.clone()
    with torch.no_grad():
        crit(torch.randn(batch, D), torch.randn(batch, D))
    assert torch.equal(crit.memory_bank.bank, before) and crit.memory_bank.ptr == ptr


def test_int_size_takes_the_dim_from_the_first_batch():
    with pytest.warns(UserWarning, match="feature dimension"):
        crit = NTXentLoss(memory_bank_size=6)
    torch.manual_seed(7)
    loss = crit(torch.randn(3, 5, requires_grad=True), torch.randn(3, 5))
    assert crit.memory_bank.bank.shape == (6, 5) and crit.memory_bank.ptr == 3 and torch.isfinite(loss)
    bank = MemoryBank(0)
    assert not bank.enabled and bank(torch.randn(2, 3), update=True) is None


def test_bank_follows_the_outputs_device():
    """lightly moves its negatives to the outputs' device, so a criterion left on the CPU works
    with GPU outputs: the bank moves there on first use (meta stands in for the GPU here)."""
    crit = NTXentLoss(memory_bank_size=(16, 8), backend="reference")
    out0 = torch.randn(4, 8, device="meta", requires_grad=True)
    loss = crit(out0, torch.randn(4, 8, device="meta"))
    assert loss.device.type == "meta" and crit.memory_bank.bank.device.type == "meta"
    assert crit.memory_bank.ptr == 4
    with pytest.raises(ValueError, match="same batch size"):  # checked before anything is enqueued
        crit(out0, torch.randn(3, 8, device="meta"))
    assert crit.memory_bank.ptr == 4



def test_compiled_steps_do_not_recompile_per_pointer():
    """The write pointer is a host int; a compiled step must not guard on it (a graph per pointer
    position, then the recompile limit), and must step the bank as eager mode does."""
    num, batch = 50, 3  # 17 pointer positions, beyond dynamo's recompile limit of 8
    torch.manual_seed(5)
    eager = NTXentLoss(0.2, memory_bank_size=(num, D), backend="reference")
    torch.manual_seed(5)
    compiled_crit = NTXentLoss(0.2, memory_bank_size=(num, D), backend="reference")
    step = torch.compile(lambda a, b: compiled_crit(a, b), backend="eager")
    g = torch.Generator().manual_seed(3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(20):
            out0, out1 = randn(batch, D, generator=g, requires_grad=True), randn(batch, D, generator=g)
            assert_close(step(out0, out1), eager(out0, out1), torch.float32, f"step {i}")
    assert compiled_crit.memory_bank.ptr == eager.memory_bank.ptr
    assert torch.equal(compiled_crit.memory_bank.bank, eager.memory_bank.bank)


def test_copied_banks_keep_enqueue_out_of_graphs(monkeypatch):
    """The bank's writes are put outside compiled graphs when a bank is built, not at import;
    a copy or unpickling (no __init__) must do it too."""
    bank = MemoryBank((5, 3))
    assert MemoryBank._enqueue._fastcl_outside_graphs
    monkeypatch.setattr(MemoryBank, "_enqueue", lambda self, batch, sizes=None: None)  # as before any bank
    copy.deepcopy(bank)
    assert getattr(MemoryBank._enqueue, "_fastcl_outside_graphs", False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_loss_gives_the_negatives_no_gradient(backend):
    """The bank is a constant (lightly stores detached outputs): negatives that require grad are
    detached, so they get no gradient, while the outputs and the loss are as with plain ones."""
    g = torch.Generator().manual_seed(3)
    out0, out1 = randn(9, 13, generator=g, requires_grad=True), randn(9, 13, generator=g)
    negatives = F.normalize(randn(17, 13, generator=g), dim=1).requires_grad_()
    loss = ntxent_bank_loss(out0, out1, negatives, 0.3, backend=backend)
    assert loss.grad_fn is not None
    loss.backward()
    assert negatives.grad is None
    ref = o_bank_ntxent(out0.detach().double(), out1.double(), negatives.detach().double(), 0.3)
    assert_close(loss, ref, torch.float32, "loss")


def test_bank_loss_default_temperature():
    """ntxent_bank_loss without a temperature takes lightly's NTXentLoss default, 0.5 (the module
    always passes its own, so only a direct call reads it)."""
    g = torch.Generator().manual_seed(54)
    out0, out1 = randn(N, D, generator=g), randn(N, D, generator=g)
    bank = F.normalize(randn(K, D, generator=g), dim=1)
    assert_close(ntxent_bank_loss(out0, out1, bank), o_bank_ntxent(out0.double(), out1.double(), bank.double(), 0.5),
                 torch.float32, "default temperature")
