"""Eager calls of fastcl's custom ops without the ``torch.library`` dispatch.

Every fused op is a ``torch.library`` custom op, so ``torch.compile`` sees one opaque node with a
fake kernel.  In plain eager mode that dispatch is pure host time on every call (a redispatch,
the schema's defaults filled back in, dynamo-disable wrappers, a generated autograd Function):
a tiny CLIP step took 1.2x to 1.5x the host time with it on a 2-core CPU
(``benchmarks/host_overhead.py``, figures in benchmarks/README.md).
So eager calls on plain tensors run the same implementation and the same autograd formula
through a plain ``torch.autograd.Function``; torch.compile, dispatch modes (FakeTensorMode, ...),
tensor subclasses, torch.func transforms and the legacy batched gradients of
``torch.autograd.functional.jacobian(vectorize=True)`` / ``is_grads_batched`` still get the
custom op (its per-sample fallback serves them).
"""
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from fastcl.validation import functorch_active

_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", lambda t: False)
# nn.Parameter only switches torch_function off: as plain as a tensor for this choice.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_custom_op(*tensors: Optional[torch.Tensor]) -> bool:
    """True under torch.compile, inside a dispatch mode or a torch.func transform, or when a
    given tensor is a subclass or a legacy batched tensor (the gradients of a vectorized
    jacobian): then the call must go through the custom op.  None entries are skipped."""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or functorch_active()
            or any(t is not None and (type(t) not in _PLAIN or _legacy_batched(t)) for t in tensors))


def eager_autograd(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` subclass named ``name`` equal to ``impl`` as a custom op with
    ``register_autograd(backward, setup_context=setup_context)``: ``apply(*inputs)`` returns
    ``impl(*inputs)``, ``setup_context(ctx, inputs, output)`` runs after it, and
    ``backward(ctx, *grads)`` returns one gradient (or None) per input, as it does for the op
    (``setup_context`` may switch off the zero gradients of unused outputs, which applies to both)."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
