"""Eager calls of fastcl's custom ops without the ``torch.library`` dispatch.

Every fused op is a ``torch.library`` custom op, so ``torch.compile`` sees one opaque node with a
fake kernel.  In plain eager mode that dispatch is pure host time on every call (a redispatch,
the schema's defaults filled back in, dynamo-disable wrappers, a generated autograd Function):
a tiny CLIP step took 1.2x to 1.5x the host time with it on a 2-core CPU
(``benchmarks/host_overhead.py``, figures in benchmarks/README.md).
So eager calls on plain tensors run the same implementation and the same autograd formula
through a plain ``torch.autograd.Function``; torch.compile, dispatch modes (FakeTensorMode, ...),
tensor subclasses and the legacy batched gradients of
``torch.autograd.functional.jacobian(vectorize=True)`` / ``is_grads_batched`` still get the
custom op (its per-sample fallback serves them).  torch.func transforms take the Function too: it
has ``setup_context`` and a per-sample ``vmap`` rule, so ``grad``, ``vmap`` and their nestings work
(the custom op's generated autograd refuses ``torch.func.grad``).
"""
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", lambda t: False)
# nn.Parameter only switches torch_function off: as plain as a tensor for this choice.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_custom_op(*tensors: Optional[torch.Tensor]) -> bool:
    """True under torch.compile or inside a dispatch mode, or when a given tensor is a subclass
    or a legacy batched tensor (the gradients of a vectorized jacobian): then the call must go
    through the custom op.  None entries are skipped.  (Inside a torch.func transform the
    tensors seen here are plain: functorch unwraps them before a Function's forward.)"""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or any(t is not None and (type(t) not in _PLAIN or _legacy_batched(t)) for t in tensors))


def per_sample_vmap(function: type) -> Callable:
    """A ``vmap`` staticmethod for the ``torch.autograd.Function`` ``function``: one call per
    sample, the results stacked along dim 0, as the custom ops' per-sample fallback does.  Each
    call keeps the Function's autograd formula, so ``vmap(grad(f))`` gives per-sample gradients.
    Outputs are tensors, or a tuple of tensors (0-d, integer and non-differentiable ones stack alike)."""

    def vmap(info, in_dims, *inputs):
        results = [function.apply(*(x if d is None else x.select(d, i) for x, d in zip(inputs, in_dims)))
                   for i in range(info.batch_size)]
        if not isinstance(results[0], tuple):
            return torch.stack(results), 0
        return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])

    return vmap


def eager_autograd(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` subclass named ``name`` equal to ``impl`` as a custom op with
    ``register_autograd(backward, setup_context=setup_context)``: ``apply(*inputs)`` returns
    ``impl(*inputs)``, ``setup_context(ctx, inputs, output)`` runs after it, and
    ``backward(ctx, *grads)`` returns one gradient (or None) per input, as it does for the op
    (``setup_context`` may switch off the zero gradients of unused outputs, which applies to both).
    It has a per-sample ``vmap`` rule (``per_sample_vmap``)."""

    def forward(*inputs):
        return impl(*inputs)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                     "backward": staticmethod(backward)})
    function.vmap = staticmethod(per_sample_vmap(function))
    return function
