"""The losses do not wait for the GPU: no value is read back to the host in a forward and backward
that takes no index from the user (README, "No host syncs").  On a GPU this is checked
directly with ``torch.cuda.set_sync_debug_mode("error")``; without one, a dispatch mode records
the ATen calls that would read a CUDA tensor's values on the host (``.item()``, ``int(t)``,
data-dependent output sizes, boolean-mask indexing) in the Python code the two devices share."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl
from fastcl._ext import extension_available

aten = torch.ops.aten
# Ops whose CUDA implementations copy a value to the host: a scalar read, or an output whose size
# depends on the data.
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
          aten.equal.default, aten.is_nonzero.default, aten.repeat_interleave.Tensor}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostReads(TorchDispatchMode):
    """Records the ATen calls (by name) that would make a CUDA tensor's value travel to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] or []))
        if func in _READS or bool_index:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _losses(backend, scale, bias):
    """name -> loss of two (N, D) batches, with every setting a number or a tensor like ``scale``."""
    return {
        "clip": lambda x, y: fastcl.clip_loss(x, y, scale, backend=backend),
        "clip with bias": lambda x, y: fastcl.clip_loss(x, y, scale, bias, backend=backend),
        "clip, python scale": lambda x, y: fastcl.clip_loss(x, y, 14.0, backend=backend),
        "siglip": lambda x, y: fastcl.siglip_loss(x, y, scale, bias, backend=backend),
        "info_nce": lambda x, y: fastcl.info_nce(x, y, temperature=0.07, backend=backend),
        "info_nce, symmetric": lambda x, y: fastcl.info_nce(x, y, logit_scale=scale, symmetric=True,
                                                            backend=backend),
        "ntxent": lambda x, y: fastcl.ntxent_loss(x, y, backend=backend),
        "dcl": lambda x, y: fastcl.dcl_loss(x, y, backend=backend),
        "dcl, separate": lambda x, y: fastcl.dcl_loss(x, y, negatives="separate", backend=backend),
        "hypersphere": lambda x, y: fastcl.hypersphere_loss(x, y, backend=backend),
        "supcon, SimCLR": lambda x, y: fastcl.supcon_loss(torch.stack([x, y], 1), backend=backend),
    }


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
def test_shared_loss_code_reads_nothing_back():
    """CPU stand-in: settings as numbers (a CPU tensor's sign is read on purpose; a CUDA one's is not)."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(67, 40, generator=g), torch.randn(67, 40, generator=g)
    found = {}
    for name, fn in _losses("cpu", 14.0, -1.0).items():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        with HostReads() as reads:
            fn(x, y).backward()
        if reads.calls:
            found[name] = reads.calls
    assert not found, f"host reads of tensor values: {found}"


def test_the_recorder_sees_host_reads():
    with HostReads() as reads:
        t = torch.arange(5.0)
        float(t.sum()), t[t > 2], torch.unique(t), int(t.max())
    assert reads.calls.count("aten._local_scalar_dense.default") == 2
    assert "aten.index.Tensor" in reads.calls and "aten._unique2.default" in reads.calls


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_losses_wait_for_no_host_sync_on_gpu(backend, request):
    """Forward and backward under set_sync_debug_mode("error"), settings as CUDA tensors, after
    one warm-up call (kernel compilation)."""
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    g = torch.Generator(device="cuda").manual_seed(6)
    a, b = (torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-1.0, device="cuda", requires_grad=True)
    losses = _losses(backend, scale, bias)
    losses["macl"] = lambda x, y: fastcl.macl_loss(x, y, backend=backend)  # its temperature is a tensor
    losses["nn.ClipLoss"] = lambda x, y: fastcl.nn.ClipLoss()(x, y, scale)
    failed = {}
    for name, fn in losses.items():
        for checked in (False, True):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            torch.cuda.set_sync_debug_mode("error" if checked else 0)
            try:
                fn(x, y).backward()
            except RuntimeError as exc:
                failed[name] = str(exc)[:200]
                break
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert not failed, failed
