"""Tiny torch.distributed helpers, resolved at call time (no-ops when not initialised).

The trainer's once-per-logging-step sum of the quantizer statistics (core.quant_stats) and the
quantizers' algorithmic collectives (EMA sums, k-means / restart broadcasts) go through these so one
code path serves a laptop and ``torchrun``. Rank 0 evaluating alone issues no collective: evaluation
reads the quantizer through ``Quantizer.encode`` / eval mode, which runs none. Every tensor handed to a collective lives on the
training device (NCCL, the backend whenever CUDA is present, reduces only CUDA tensors): the
statistics derive from the batch, and a tensor made here from a Python value is created on the
device the caller passes (tests/test_collective_devices.py checks this without a GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised (checked on every call)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks IN PLACE (not differentiable); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` is untouched; not differentiable)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


@torch.no_grad()
def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Copy rank ``src``'s ``t`` to every rank in place (e.g. a k-means codebook init)."""
    if is_distributed():
        dist.broadcast(t, src)
    return t


# ---- process-level helpers used by the trainer (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) ----


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", 0))


def setup_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    import os

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_grads_(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks (for modules trained outside DistributedDataParallel, such as
    a discriminator stepped on detached outputs)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. one rank got Ctrl-C). ``device``: the
    training device (where the flag's tensor must live for the backend to reduce it)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_ddp(module: torch.nn.Module, device: torch.device, find_unused: bool = True) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else ``module`` itself."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
