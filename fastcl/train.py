"""A small training loop for contrastive models: gradient caching, bf16, DDP, checkpoints, metrics.

The loop owns data order and randomness so that a checkpoint captures everything needed to
continue a run bit-identically (on the CPU; GPU kernels may be non-deterministic): the data order
is a function of (seed, epoch), and every step reseeds its random streams from (seed, rank, step).

Contract: ``model(*inputs)`` returns a tensor or a tuple of tensors, and ``loss_fn(*outputs)``
returns a 0-d loss.  Outputs whose leading dimension equals the (chunk's) batch size are
per-sample embeddings; any other output (e.g. TwoTower's 0-d logit scale) is batch-level.
"""
import contextlib
import csv
import hashlib
import json
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
# What Trainer.state_dict writes and load_state_dict reads (the CLI checks --resume against it).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "seed", "batch_size",
                   "world_size")

Data = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _dist_info() -> Tuple[bool, int, int]:
    """(initialised, rank, world_size) of torch.distributed."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return True, d.get_rank(), d.get_world_size()
    return False, 0, 1


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except Exception:  # pragma: no cover - non-POSIX platforms
        return float("nan")


class _MetricsWriter:
    """Appends one record per step to a ``.csv`` file (by extension) or a JSON-lines file."""

    FIELDS = ("epoch", "step", "loss", "samples_per_s", "peak_mem_mb", "lr", "elapsed_s")

    def __init__(self, path: Optional[str], append: bool):
        self.path, self.file, self.csv = path, None, None
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not append or not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "w" if not append else "a", newline="")
        if path.endswith(".csv"):
            self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
            if new:
                self.csv.writeheader()

    def write(self, record: Dict) -> None:
        if self.file is None:
            return
        if self.csv is not None:
            self.csv.writerow({k: record.get(k) for k in self.FIELDS})
        else:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


_OLD_RNG_KEYS = ("torch_rng", "cuda_rng", "generator", "python_rng")


def upgrade_checkpoint(state, world_size: int):
    """``state`` in today's form.  An earlier fastcl's checkpoint holds RNG states (every step now
    reseeds instead) and no world_size, which is taken to be this run's (``fastcl train``'s
    schedule check still compares the step counts).  Anything else is returned as is."""
    if isinstance(state, dict) and "world_size" not in state and all(k in state for k in _OLD_RNG_KEYS):
        state = {k: v for k, v in state.items() if k not in _OLD_RNG_KEYS}
        state["world_size"] = world_size
    return state


def data_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A short hash of each tensor's shape and 16 evenly spaced values (one small read, one device
    sync for GPU data): ranks that were given different data, e.g. their own shards, differ in it."""
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), steps=min(16, flat.numel())).long().to(flat.device)
        values = flat[idx].double().tolist()
        parts.append((tuple(t.shape), str(t.dtype), ["nan" if v != v else v for v in values]))
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def data_order_mismatch(state: Dict, seed: int, batch_size: int,
                        world_size: int) -> Optional[Tuple[str, object, int]]:
    """(key, checkpoint's value, this run's value) of the first of seed, batch_size and world_size
    that differ between a checkpoint ``state`` and this run (they fix the data order), or None."""
    for key, here in (("seed", seed), ("batch_size", batch_size), ("world_size", world_size)):
        if state[key] != here:
            return key, state[key], here
    return None


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    # SplitMix64's finaliser: nearby inputs (consecutive steps, ranks) give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's random streams on one rank, in [0, 2**64) (what
    torch.manual_seed takes).  Ranks differ, so under torchrun they don't draw the same
    augmentations for their different samples; and a resumed run draws as an uninterrupted one."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ rank) ^ step)


def epoch_steps(n: int, world_size: int, batch_size: int) -> int:
    """Steps each of ``world_size`` processes takes an epoch over ``n`` rows: every rank takes the
    same number (their collectives pair up), so the rows left over by ``n % world_size`` and the
    last partial batch are not used."""
    return (n // world_size) // batch_size


class Trainer:
    """Trains ``model`` with ``loss_fn`` on in-memory tensors.

    Args:
        model: ``nn.Module``; ``model(*inputs)`` -> tensor or tuple of tensors (see module doc).
        loss_fn: callable ``loss_fn(*outputs)`` -> 0-d float tensor, e.g. a fastcl loss.
        optimizer: a ``torch.optim.Optimizer`` over the model's (and the loss's) parameters.
        batch_size: samples per step and per process, >= 2 (contrastive losses need negatives).
        chunk_size: gradient caching.  When set, the encoders run ``chunk_size`` samples at a time:
            a no-grad forward of every chunk, the loss on the full batch of (detached) embeddings,
            then each chunk re-run with grad, under the RNG state saved for it, back-propagating
            the cached embedding gradients.  Parameter gradients equal the unchunked step (up to
            float rounding) for models whose outputs are per-sample (no BatchNorm in train mode);
            activation memory grows with ``chunk_size`` instead of ``batch_size``.
        precision: "fp32", or "bf16" to run model and loss under ``torch.autocast`` (on the GPU,
            or the CPU when training there).
        device: where the model runs; default the device of the model's first parameter.
        transform: optional ``transform(batch, generator) -> inputs``: ``batch`` is the tuple of
            the data tensors indexed for this step, ``generator`` the trainer's CPU
            ``torch.Generator``, to be used for augmentation randomness.
        scheduler: optional LR scheduler stepped after every optimizer step.
        seed: seeds the data order, and with the rank and step (``step_seed``) the random streams
            of every step: the transform generator and torch's and Python's global RNGs, which the
            trainer reseeds before each step's transform.
        metrics_path: optional file receiving one record per step (CSV if it ends in ``.csv``,
            else JSON lines).
        checkpoint_path: optional file written at the end of every epoch, every
            ``checkpoint_every`` steps, and when ``max_steps`` stops the run.
        checkpoint_every: optional step interval for checkpoints.
        progress: show a progress bar (tqdm when installed, else a printed line every
            ``log_every`` steps) up to the step the run stops at (``max_steps`` included); its
            epoch counts from 0, like the ``epoch`` of the metric records.
        log_every: step interval of the plain printed progress lines.

    Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
    ``DistributedDataParallel`` and each process trains on its own 1/world_size share of every
    epoch's permutation.  ``loss_fn`` sees the local batch: pass a distributed loss
    (``fastcl.losses.distributed``, or a module with ``gather_distributed=True``) to take the
    negatives from every rank, as ``fastcl train`` does.  Every rank passes the same ``data``:
    ``fit`` first checks that the ranks agree on its size and sampled values (``data_fingerprint``),
    the epochs, ``max_steps``, batch size, seed and resumed step (they would otherwise take
    different step counts and wait forever in a collective, or train on the wrong rows), and every
    rank raises if not.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, *,
                 batch_size: int, chunk_size: Optional[int] = None, precision: str = "fp32",
                 device: Union[str, torch.device, None] = None, transform: Optional[Callable] = None,
                 scheduler=None, seed: int = 0, metrics_path: Optional[str] = None,
                 checkpoint_path: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 progress: bool = True, log_every: int = 10):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_int("batch_size", batch_size, 2)
        if chunk_size is not None:
            _check_int("chunk_size", chunk_size, 1)
            if chunk_size > batch_size:
                raise ValueError(f"chunk_size must be <= batch_size, got chunk_size={chunk_size} > "
                                 f"batch_size={batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        _check_int("seed", seed, 0)
        if checkpoint_every is not None:
            _check_int("checkpoint_every", checkpoint_every, 1)
        _check_int("log_every", log_every, 1)
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.loss_fn, self.optimizer, self.scheduler, self.transform = loss_fn, optimizer, scheduler, transform
        self.batch_size, self.chunk_size, self.precision, self.seed = batch_size, chunk_size, precision, seed
        self.metrics_path, self.checkpoint_path, self.checkpoint_every = metrics_path, checkpoint_path, checkpoint_every
        self.progress, self.log_every = progress, log_every
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: List[Dict] = []
        self._ddp, self.rank, self.world_size = _dist_info()
        model = model.to(self.device)
        if self._ddp and not isinstance(model, nn.parallel.DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model

    # ----------------------------------------------------------------------------- one step
    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, inputs: tuple) -> tuple:
        with self._autocast():
            return _as_tuple(self.model(*inputs))

    def _loss(self, outputs: tuple) -> torch.Tensor:
        with self._autocast():
            loss = self.loss_fn(*outputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a 0-d tensor")
        return loss.reshape(())

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def compute_gradients(self, inputs: tuple) -> torch.Tensor:
        """Forward + backward of one batch, accumulating parameter gradients; returns the 0-d loss.

        ``inputs`` is the tuple of model inputs, each (B, ...) on ``self.device``.
        """
        batch = inputs[0].shape[0]
        for i, x in enumerate(inputs):
            if x.shape[0] != batch:
                raise ValueError(f"every model input must hold the same number of samples; input 0 has "
                                 f"{batch} and input {i} has {x.shape[0]}")
        if self.chunk_size is None or self.chunk_size >= batch:
            loss = self._loss(self._forward(inputs))
            loss.backward()
            return loss.detach()
        return self._cached_gradients(inputs, batch)

    def _cached_gradients(self, inputs: tuple, batch: int) -> torch.Tensor:
        c = self.chunk_size
        bounds = [(s, min(s + c, batch)) for s in range(0, batch, c)]
        chunks = [tuple(x[s:e] for x in inputs) for s, e in bounds]
        # The no-grad pass must not update BatchNorm running stats: the replay does that once.
        buffers = [b.detach().clone() for b in self.module.buffers()]
        states, outs = [], []
        with torch.no_grad():
            for ch in chunks:
                states.append(self._rng_state())
                outs.append(self._forward(ch))
        with torch.no_grad():
            for b, saved in zip(self.module.buffers(), buffers):
                b.copy_(saved)
        first = outs[0]
        per_sample = [o.dim() >= 1 and o.shape[0] == (bounds[0][1] - bounds[0][0]) for o in first]
        leaves = []
        for j, o in enumerate(first):
            v = torch.cat([out[j] for out in outs]) if per_sample[j] else o
            leaves.append(v.detach().requires_grad_(v.is_floating_point()))
        del outs
        loss = self._loss(tuple(leaves))
        loss.backward()
        grads = [leaf.grad for leaf in leaves]
        last = len(chunks) - 1
        for i, ((s, e), ch) in enumerate(zip(bounds, chunks)):
            self._set_rng_state(states[i])
            # Under DDP, all-reduce only once, on the last chunk's backward.
            sync = contextlib.nullcontext() if (i == last or not self._ddp) else self.model.no_sync()
            with sync:
                out = self._forward(ch)
                tensors, grad_tensors = [], []
                for j, o in enumerate(out):
                    g = grads[j]
                    if g is None or not o.requires_grad:
                        continue
                    if per_sample[j]:
                        g = g[s:e]
                    elif i != last:  # batch-level outputs (logit scale) contribute once
                        continue
                    tensors.append(o)
                    grad_tensors.append(g.to(o.dtype))
                if tensors:
                    torch.autograd.backward(tensors, grad_tensors)
        return loss.detach()

    def train_step(self, inputs: tuple) -> float:
        """One optimizer step on ``inputs`` (tuple of (B, ...) tensors); returns the loss as a float."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_gradients(tuple(x.to(self.device, non_blocking=True) for x in inputs))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        """Everything a resumed run needs: model, optimizer, scheduler, position, and what fixes
        the data order (seed, batch size, number of processes).  No RNG state: every step reseeds."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore a ``state_dict()``; the seed, batch size and number of processes must match
        (they fix the data order).  An earlier fastcl's checkpoint is read too (``upgrade_checkpoint``)."""
        state = upgrade_checkpoint(state, self.world_size)
        missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
        if missing:
            raise ValueError(f"not a Trainer checkpoint: missing {missing}")
        mismatch = data_order_mismatch(state, self.seed, self.batch_size, self.world_size)
        if mismatch is not None:
            key, saved, here = mismatch
            raise ValueError(f"checkpoint was written with {key}={saved}, but this trainer has "
                             f"{key}={here}; they must match to resume the same data order")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]

    def save_checkpoint(self, path: str) -> None:
        """Write ``state_dict()`` to ``path`` atomically (rank 0 only under DDP)."""
        if self.rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint written by ``save_checkpoint``."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume checkpoint {path!r} does not exist")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    # ----------------------------------------------------------------------------- the loop
    def _epoch_order(self, n: int, epoch: int) -> torch.Tensor:
        # A pure function of (seed, epoch): resuming mid-epoch recomputes the same order.
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * (epoch + 1))
        perm = torch.randperm(n, generator=g)
        return perm[self.rank::self.world_size]

    def _prepare_fit(self, data: Data, epochs: int, resume: Optional[str], max_steps: Optional[int]):
        """fit's argument checks and resume: (data tensors, steps per epoch)."""
        tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("data must be a tensor or a non-empty sequence of tensors")
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if t.shape[0] != n:
                raise ValueError(f"data tensors must share their first dimension; data[0] has {n} rows "
                                 f"and data[{i}] has {t.shape[0]}")
        _check_int("epochs", epochs, 1)
        if max_steps is not None:
            _check_int("max_steps", max_steps, 1)
        local_n = n // self.world_size
        steps_per_epoch = epoch_steps(n, self.world_size, self.batch_size)
        if steps_per_epoch == 0:
            raise ValueError(f"batch_size={self.batch_size} is larger than the {local_n} samples per process "
                             f"in data; lower batch_size")
        if resume is not None:
            self.load_checkpoint(resume)
        return tensors, steps_per_epoch

    def _check_ranks_agree(self, error: Optional[BaseException], settings: Dict) -> None:
        """Under DDP, one exchange of every rank's fit settings (or its error) before the first
        step: ranks that differ would take different step counts and wait forever in a collective,
        so every rank raises instead, naming what differs (a rank's own error stays its own)."""
        every: List = [None] * self.world_size
        # NCCL packs the objects on the current CUDA device: make it this rank's.
        here = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with here:
            torch.distributed.all_gather_object(every, (None if error is None else repr(error), settings))
        failed = [r for r, (e, _) in enumerate(every) if e is not None]
        if failed:
            if error is None:
                raise RuntimeError(f"Trainer.fit failed on rank(s) {failed}: "
                                   + "; ".join(f"rank {r}: {every[r][0]}" for r in failed))
            return
        for key, mine in settings.items():
            values = [theirs[key] for _, theirs in every]
            if any(v != mine for v in values):
                hint = (" (sampled values' hashes: each rank takes its own share of the full data, so pass "
                        "every rank the same full data, not its shard)") if key == "data" else ""
                raise ValueError(f"Trainer.fit needs the same {key} on every rank (each rank takes the same "
                                 f"steps and data order), got {values} by rank{hint}")

    def fit(self, data: Data, epochs: int, *, resume: Optional[str] = None,
            max_steps: Optional[int] = None) -> List[Dict]:
        """Train for ``epochs`` epochs over ``data``; returns the per-step metric records.

        Args:
            data: a tensor (N, ...) or a sequence of tensors sharing N, indexed along dim 0.
            epochs: total number of epochs (a resumed run continues up to this number).
            resume: optional checkpoint path to continue from.
            max_steps: optional cap on the total (global) step count; the run stops there and
                writes a checkpoint, e.g. to test or split a run.
        """
        try:
            tensors, steps_per_epoch = self._prepare_fit(data, epochs, resume, max_steps)
            error = None
        except Exception as exc:  # under DDP the other ranks hear of it (they would wait for this one)
            error, tensors, steps_per_epoch = exc, None, 0
        if self._ddp:
            n = tensors[0].shape[0] if tensors else None
            self._check_ranks_agree(error, {"rows of data": n, "epochs": epochs, "max_steps": max_steps,
                                            "global_step": self.global_step, "batch_size": self.batch_size,
                                            "seed": self.seed,
                                            "data": data_fingerprint(tensors) if tensors else None})
        if error is not None:
            raise error
        n = tensors[0].shape[0]
        metrics = _MetricsWriter(self.metrics_path if self.rank == 0 else None, append=resume is not None)
        total = epochs * steps_per_epoch
        stop = total if max_steps is None else min(total, max_steps)
        bar = self._make_bar(stop) if self.progress and self.rank == 0 else None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start, done_samples = time.perf_counter(), 0
        try:
            while self.global_step < stop:
                if self.step_in_epoch >= steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                order = self._epoch_order(n, self.epoch)
                idx = order[self.step_in_epoch * self.batch_size:(self.step_in_epoch + 1) * self.batch_size]
                batch = tuple(t[idx] for t in tensors)
                self._seed_step()
                inputs = _as_tuple(self.transform(batch, self.generator)) if self.transform else batch
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps after it)
                loss = self.train_step(inputs)
                self.step_in_epoch += 1
                self.global_step += 1
                done_samples += self.batch_size
                elapsed = time.perf_counter() - start
                record = {"epoch": self.epoch, "step": self.global_step, "loss": loss,
                          "samples_per_s": done_samples / max(elapsed, 1e-9),
                          "peak_mem_mb": peak_memory_mb(self.device),
                          "lr": lr, "elapsed_s": elapsed}
                self.history.append(record)
                metrics.write(record)
                self._report(bar, record, stop)
                end_of_epoch = self.step_in_epoch == steps_per_epoch
                periodic = self.checkpoint_every is not None and self.global_step % self.checkpoint_every == 0
                if self.checkpoint_path and (end_of_epoch or periodic or self.global_step == stop):
                    self.save_checkpoint(self.checkpoint_path)
        finally:
            metrics.close()
            if bar is not None and bar is not False:
                bar.close()
        return self.history

    def _seed_step(self) -> None:
        s = step_seed(self.seed, self.rank, self.global_step)
        self.generator.manual_seed(s)
        torch.manual_seed(s)
        random.seed(s)

    def _make_bar(self, total: int):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return False  # plain printed lines instead
        return tqdm(total=total, initial=self.global_step, desc="train", unit="step", dynamic_ncols=True)

    def _report(self, bar, r: Dict, stop: int) -> None:
        if bar is None:
            return
        if bar is False:
            if r["step"] % self.log_every == 0 or r["step"] == stop:
                print(f"step {r['step']}/{stop} epoch {r['epoch']} loss {r['loss']:.4f} "
                      f"{r['samples_per_s']:.0f} samples/s peak {r['peak_mem_mb']:.0f} MiB", file=sys.stderr)
            return
        bar.update(1)
        bar.set_postfix(epoch=r["epoch"], loss=f"{r['loss']:.4f}", sps=f"{r['samples_per_s']:.0f}",
                        mem=f"{r['peak_mem_mb']:.0f}MiB", refresh=False)


def fit(model: nn.Module, loss: Callable, data: Data, optimizer: torch.optim.Optimizer, *, epochs: int,
        batch_size: int, chunk_size: Optional[int] = None, precision: str = "fp32",
        resume: Optional[str] = None, max_steps: Optional[int] = None, **kwargs) -> List[Dict]:
    """Functional front end: ``Trainer(model, loss, optimizer, ...).fit(data, epochs)``.

    ``data`` is a tensor (N, ...) or a sequence of tensors sharing N; other keyword arguments go
    to ``Trainer`` (transform, device, scheduler, seed, metrics_path, checkpoint_path, ...).
    Returns the list of per-step metric records (dicts).
    """
    trainer = Trainer(model, loss, optimizer, batch_size=batch_size, chunk_size=chunk_size,
                      precision=precision, **kwargs)
    return trainer.fit(data, epochs, resume=resume, max_steps=max_steps)
