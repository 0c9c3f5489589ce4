"""A first-in first-out bank of past outputs, the negatives of MoCo-style losses (lightly's
``MemoryBankModule`` semantics, which ``NTXentLoss(memory_bank_size=...)`` uses)."""
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastcl.distributed import all_gather_no_grad, exchange_shapes, is_distributed
from fastcl.validation import check_float_tensor


def bank_size(size: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """``(num_features,)`` or ``(num_features, dim)`` from an int or a sequence; ValueError naming
    ``memory_bank_size`` for negative or malformed sizes."""
    if isinstance(size, bool) or not isinstance(size, (int, Sequence)) or isinstance(size, str):
        raise TypeError(f"memory_bank_size must be an int or a (num_features, dim) tuple, got {size!r}")
    size_tuple = (size,) if isinstance(size, int) else tuple(size)
    if (len(size_tuple) not in (1, 2) or any(isinstance(x, bool) or not isinstance(x, int) for x in size_tuple)
            or any(x < 0 for x in size_tuple)):
        raise ValueError(f"memory_bank_size must be a non-negative int or (num_features, dim) tuple, got {size!r}")
    return size_tuple


class MemoryBank(nn.Module):
    """Holds the last ``num_features`` rows of the outputs it is given, oldest overwritten first.

    ``size``: ``(num_features, dim)``, or an int ``num_features`` whose ``dim`` is taken from the
    first batch (lightly warns about that form, and so does this).  ``num_features == 0`` disables
    the bank.  The rows start as random unit vectors (``torch.randn`` then normalised, drawn from
    the global generator when the dim is known, as lightly does).  With ``gather_distributed`` and
    more than one rank, every rank enqueues the batches of all ranks, in rank order.  The bank is a
    float32 buffer that moves with the module and is not saved in its state dict.
    """

    def __init__(self, size: Union[int, Sequence[int]] = 65536, gather_distributed: bool = False, *, group=None):
        super().__init__()
        self.size = bank_size(size)
        self.gather_distributed, self.group = gather_distributed, group
        self.register_buffer("bank", torch.empty(self.size, dtype=torch.float), persistent=False)
        _enqueue_outside_compiled_graphs()
        self.ptr = 0  # next row to write; a host int, so a step never waits for the device to read it
        if len(self.size) == 1 and self.size[0] > 0:
            warnings.warn(f"memory_bank_size={size} gives no feature dimension; it is taken from the first "
                          "batch. Give (num_features, dim) to fix it up front.", UserWarning)
        elif len(self.size) == 2:
            self._init_bank(self.size)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    @torch.no_grad()
    def _init_bank(self, size: Tuple[int, ...]) -> None:
        self.bank = nn.functional.normalize(torch.randn(size), dim=-1).to(self.bank)
        self.ptr = 0

    def forward(self, output: torch.Tensor, update: bool = False, *,
                local_error: Optional[BaseException] = None) -> Optional[torch.Tensor]:
        """The bank's rows before this call, (num_features, dim) float32 detached, on
        ``output``'s device (None when disabled); with ``update``, ``output`` (N, dim), any floating
        dtype, is then enqueued (stored as float32).  The bank moves to ``output``'s device on first
        use, as lightly moves its negatives there (a criterion is often left on the CPU).
        ``local_error``: a failed argument check of the caller; under ``gather_distributed`` it is
        published to the other ranks in the enqueue's collective, so that every rank raises instead
        of waiting.  Only an update is collective (a read on one rank does not wait), so every rank
        of the group must pass the same ``update``, as with lightly."""
        if not self.enabled:
            if local_error is not None:
                raise local_error
            return None
        err = local_error
        if err is None:
            try:
                self._prepare(output)
            except (TypeError, ValueError) as e:
                err = e
        sizes = None
        if update and self.gather_distributed and is_distributed(self.group):
            # Only an update is collective, as in lightly: a read on one rank (evaluation, logging)
            # must not wait for the others.  So every rank must pass the same ``update``.  The rows
            # go in detached: only their shapes are compared.
            rows = output.detach() if isinstance(output, torch.Tensor) else output
            sizes = exchange_shapes([("out1", rows)], self.group, err)[0]
        elif err is not None:
            raise err
        bank = self.bank.clone()
        if update:
            self._enqueue(output, sizes)
        return bank

    def _prepare(self, output: torch.Tensor) -> None:
        # Before the bank takes its row size from the first batch.
        check_float_tensor("output", output, "(N, dim)", non_empty=False)
        if output.shape[1] == 0:
            raise ValueError(f"output must have dim >= 1, got shape {tuple(output.shape)}")
        if self.bank.dim() == 1:
            self._init_bank((self.size[0], output.shape[1]))
        if output.dim() != 2 or output.shape[1:] != self.bank.shape[1:]:
            raise ValueError(f"memory bank rows have dim {self.bank.shape[1]}, got outputs of shape "
                             f"{tuple(output.shape)}")
        if self.bank.device != output.device:
            self.bank = self.bank.to(output.device)

    def __setstate__(self, state):  # unpickling and deepcopy skip __init__
        super().__setstate__(state)
        _enqueue_outside_compiled_graphs()

    # Outside torch.compile (see _enqueue_outside_compiled_graphs): the write pointer is a host
    # int, which a compiled graph would guard on, recompiling the caller's graph for every
    # position of the pointer.
    @torch.no_grad()
    def _enqueue(self, batch: torch.Tensor, sizes=None) -> None:
        batch = batch.detach()
        if sizes is not None:  # every rank's batch, in rank order
            batch = all_gather_no_grad(batch, sizes, self.group)
        num, ptr, n = self.size[0], self.ptr, batch.shape[0]
        if ptr + n >= num:
            # lightly's rule: fill to the end and restart at 0; rows past the end are not written
            self.bank[ptr:] = batch[:num - ptr].to(self.bank.dtype)
            self.ptr = 0
        else:
            self.bank[ptr:ptr + n] = batch.to(self.bank.dtype)
            self.ptr = ptr + n


def _enqueue_outside_compiled_graphs() -> None:
    """Puts ``MemoryBank._enqueue`` under ``torch.compiler.disable``, once.  Done when the first
    bank is built rather than at class definition: that decorator imports ``torch._dynamo``,
    about half of ``import fastcl``'s time."""
    if not getattr(MemoryBank._enqueue, "_fastcl_outside_graphs", False):
        disabled = torch.compiler.disable(MemoryBank._enqueue)
        disabled._fastcl_outside_graphs = True
        MemoryBank._enqueue = disabled
