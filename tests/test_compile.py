"""torch.compile(fullgraph=True) over fastcl losses: no graph break, gradients equal eager."""
import pytest
import torch

import fastcl
from conftest import assert_close
from fastcl._ext import extension_available


def _run(fn, img, txt, scale):
    img, txt, scale = (t.detach().clone().requires_grad_() for t in (img, txt, scale))
    loss = fn(img, txt, scale)
    loss.backward()
    return [loss, img.grad, txt.grad, scale.grad]


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_clip_loss_compiles_without_graph_break_cpu(compiler):
    torch._dynamo.reset()

    labels = torch.randperm(67, generator=torch.Generator().manual_seed(1))

    def f(img, txt, scale):
        # Positive logits from the op: the diagonal (clip_loss, info_nce) and by index (labels, NT-Xent).
        return (fastcl.clip_loss(img, txt, scale, backend="cpu") + 0.5 * fastcl.info_nce(img, txt, logit_scale=scale)
                + fastcl.clip_loss(img, txt, scale, labels=labels, backend="cpu")
                + fastcl.ntxent_loss(img, txt, temperature=0.5, backend="cpu"))

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(67, 40, generator=gen), torch.randn(67, 40, generator=gen), torch.tensor(3.0))
    eager = _run(f, *args)
    compiled = _run(torch.compile(f, fullgraph=True, backend=compiler), *args)
    for a, b in zip(compiled, eager):
        assert_close(a, b, torch.float32)


@pytest.mark.gpu
def test_clip_loss_compiles_without_graph_break_gpu():
    torch._dynamo.reset()

    def f(img, txt, scale):
        return fastcl.clip_loss(img, txt, scale, backend="triton")

    gen = torch.Generator().manual_seed(0)
    args = tuple(t.cuda() for t in (torch.randn(1000, 256, generator=gen).bfloat16(),
                                    torch.randn(1000, 256, generator=gen).bfloat16(), torch.tensor(3.0)))
    eager = _run(f, *args)
    compiled = _run(torch.compile(f, fullgraph=True), *args)
    for a, b in zip(compiled, eager):
        assert_close(a, b, torch.bfloat16)
