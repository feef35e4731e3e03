"""Data-parallel training with torch.distributed DDP, for the finetune loop.

Launched by ``torchrun --nproc-per-node N -m ntk_attention.cli finetune ...`` (or accelerate,
which sets the same RANK / WORLD_SIZE / LOCAL_RANK variables), every process runs the same loop
on the same seeded data order. The loop's global batch is a list of row indices (a slice of the
epoch's permutation, see loop.py); rank r takes the r-th contiguous part of it:

    global batch  [ i0 i1 i2 i3 i4 ]          world size 2
    rank 0        [ i0 i1 i2 ]                loss scaled by 2 * 3/5
    rank 1        [ i3 i4 ]                   loss scaled by 2 * 2/5

DDP averages the gradients over the ranks, so scaling each rank's mean loss by
``world_size * rows_on_rank / rows_in_batch`` makes the averaged gradient the gradient of the
global batch's mean loss: the same update as one process with the whole batch (exactly for
per-row mean losses such as classification; for token-mean language-model losses up to the
rank's share of tokens). The projected gradient of kappa >= 0 (ops.nonnegative) is not linear,
so it is applied once to the all-reduced gradient (``backward``), not per rank. A rank whose part is empty (a last batch smaller than the world) runs
one row with scale 0, since every rank must take part in the gradient all-reduce.

Every rank loads the model, evaluates and holds identical parameters; only rank 0 writes
(checkpoints, adapter, results.json) and prints. Without the launcher's variables (or with
WORLD_SIZE=1) nothing is initialised and ``Distributed`` is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Distributed", "local_device", "setup"]


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job (rank 0 of 1 when not launched distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> tuple[list[int], float]:
        """This rank's rows of a global batch and the factor its mean loss is scaled by."""
        if not self.enabled:
            return list(indices), 1.0
        n = len(indices)
        part = list(indices[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size])
        if not part:
            return list(indices[:1]), 0.0
        return part, self.world_size * len(part) / n

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel (the same module when not distributed). DDP
        broadcasts rank 0's parameters and buffers, so every rank starts from the same ones."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        """``loss.backward()``; distributed, kappa's projected gradient (ops.nonnegative) is
        projected after DDP's all-reduce, as one process would project the whole batch's."""
        if not self.enabled:
            loss.backward()
            return
        from ..ops.state import deferred_nonnegative_projection, project_nonnegative_grad
        from ..tuner.state_access import kappa_parameters

        with deferred_nonnegative_projection():
            loss.backward()
        for param in kappa_parameters(model):
            if param.requires_grad:
                project_nonnegative_grad(param)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (for logging the global batch's loss)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: torch.device) -> Distributed:
    """Join the process group the launcher describes (gloo on CPU, NCCL on CUDA); once per
    process. With several ranks on CUDA, ``device`` should be ``cuda:LOCAL_RANK``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def local_device(name: str) -> str:
    """``--device auto``/``cuda`` under a launcher: the rank's own GPU (``cuda:LOCAL_RANK``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name
