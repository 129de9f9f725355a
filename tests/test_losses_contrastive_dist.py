"""Contrastive loss under torch.distributed (2 gloo ranks on CPU): features gathered across ranks,
so each rank's loss equals the single-process loss over the global batch, and gradients flow
to the local features through the gather."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from plugins.losses.contrastive import ContrastiveLoss

B, D = 6, 5


def features():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def reference() -> float:
    img, txt = features()
    logits = torch.tensor(2.0).exp() * img @ txt.t()
    return (0.5 * (F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.t(), torch.arange(B)))).item()


def _worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        img, txt = features()
        sl = slice(rank * B // world, (rank + 1) * B // world)
        local = img[sl].clone().requires_grad_()
        loss = ContrastiveLoss(ContrastiveLoss.Config())  # reads the outputs only: this rank's embeddings
        outputs = {"image_embed": local, "text_embed": txt[sl], "logit_scale": torch.tensor(2.0)}
        out = loss({}, outputs, 0).terms["clip"]
        out.backward()
        q.put((rank, out.item(), bool(local.grad.abs().sum() > 0)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned interpreters: ~50 s on the shared 2-core machine
def test_two_ranks_gather_equals_global_batch():
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), q), nprocs=2, start_method="spawn", join=True)
    results = sorted(q.get() for _ in range(2))
    ref = reference()
    for _, value, has_grad in results:
        assert value == pytest.approx(ref, rel=1e-5)
        assert has_grad
