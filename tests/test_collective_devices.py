"""Every tensor vtok hands to a torch.distributed collective is on the training device (issue 11,
item 3): NCCL, the backend whenever CUDA is present, cannot reduce a CPU tensor, and a CPU-only
test suite never notices. tests/collective_check.py wraps the collectives and, with ``FakeCuda``,
reports a tensor a CUDA run would hold on the host. Fast: one process in a fake 2-rank group
(torch's "fake" backend: collectives are no-ops). Slow: the 2-rank gloo run of test_distributed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as tdist
import torch.distributed.nn  # noqa: F401  (before any group exists: its all_gather binds the default group at import)
import yaml

from collective_check import FakeCuda, install, on_host
from conftest import ROOT, tiny_experiment
from core import dist
from core.config import validate
from core.trainer import train

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional.all_gather is deprecated")


@pytest.fixture
def fake_world():
    """A 2-rank process group in this one process (rank 0 of 2; collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def covering_experiment(quantizer: dict, semantic: bool = True) -> dict:
    """Every kind of collective vtok issues: quantizer statistics, k-means init and dead-code
    restarts (broadcast), EMA sums, the contrastive gather, discriminator gradients, the stop flag."""
    cfg = tiny_experiment(**{"train.steps": 2, "train.log_every": 1, "train.batch_size": 8})
    cfg["model"]["quantizer"] = quantizer
    cfg["losses"] = [{"type": "pixel"}, {"type": "quantizer"}]
    if semantic:
        cfg["model"]["text"] = {"width": 32, "depth": 1, "heads": 2, "context_length": 16}
        cfg["losses"] += [{"type": "contrastive"}, {"type": "adversarial", "discriminator": {"type": "patchgan", "width": 8, "depth": 1}, "adaptive": False}]
    return cfg


QUANTIZERS = {
    "vq-ema-kmeans-restart": {"type": "vq", "codebook_size": 32, "code_dim": 8, "codebook_update": "ema",
                              "kmeans_init": True, "dead_code_threshold": 1.0},
    "bsq": {"type": "bsq", "code_dim": 8, "entropy_group_size": 4},
}


def test_the_check_sees_host_tensors(fake_world, monkeypatch):
    """The checker itself: factories without a device, .cpu() and host-only arithmetic are host;
    .to(device), factories given a device and anything computed with a device tensor are not."""
    rec = install(CPU, fake_cuda=True, setattr=monkeypatch.setattr)
    with FakeCuda():
        host = torch.tensor([1.0])
        assert on_host(host) and on_host(torch.zeros(3).sum()) and on_host(host * 2)
        dev = torch.zeros(3, device=CPU)
        assert not on_host(dev) and not on_host(dev + host) and not on_host(torch.tensor([2.0]).to(CPU))
        assert on_host(dev.cpu()) and not on_host(dev) and not on_host(torch.zeros_like(dev)) and on_host(host.float())
        dev.add_(host)  # in place keeps the device
        assert not on_host(dev)
        tdist.all_reduce(host)
        tdist.all_reduce(dev)
        tdist.broadcast(torch.ones(2), 0)
    assert rec.calls == ["all_reduce", "all_reduce", "broadcast"]
    assert len(rec.violations) == 2 and all("host tensor" in v for v in rec.violations), rec.violations
    assert "test_collective_devices.py" in rec.violations[0]


def test_any_rank_reduces_a_flag_on_the_training_device(fake_world, monkeypatch):
    rec = install(CPU, fake_cuda=True, setattr=monkeypatch.setattr)
    with FakeCuda():
        assert dist.any_rank(True, CPU) is True and dist.any_rank(False, CPU) is False
    assert rec.calls == ["all_reduce", "all_reduce"] and rec.violations == []


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_training_collectives_are_on_the_training_device(name, fake_world, monkeypatch, in_tmp):
    exp = validate(covering_experiment(QUANTIZERS[name], semantic=name.startswith("vq")))
    # the fake backend cannot serve DDP's gradient buckets (reduced in C++ on the parameters' own
    # device, not what this test is about; the slow gloo test below runs them)
    monkeypatch.setattr(dist, "wrap_ddp", lambda module, device, find_unused=True: module)
    rec = install(CPU, fake_cuda=True, setattr=monkeypatch.setattr)
    with FakeCuda():
        train(exp)
    assert rec.violations == [], "\n".join(rec.violations)
    # the run really issued the collectives this test is about
    # one quantizer-statistics reduction per logging step (log_every 1) + the stop flags; the vq
    # variant adds its algorithmic ones (EMA sums, restart counts)
    if name == "bsq":
        assert rec.calls == ["all_reduce"] * (2 + 2), rec.calls
    assert rec.calls.count("all_reduce") >= 2 + 2, rec.calls
    if name.startswith("vq"):  # k-means and restarts broadcast; the contrastive loss gathers
        assert {"broadcast", "all_gather"} <= set(rec.calls), rec.calls


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from collective_check import FakeCuda, install
    from core import dist
    from core.config import load_experiment
    from core.trainer import train

    dist.setup_from_env()
    rec = install(torch.device("cpu"), fake_cuda=True)
    exp = load_experiment(sys.argv[1], sys.argv[2:])
    with FakeCuda():
        train(exp)
    json.dump({"calls": rec.calls, "violations": rec.violations}, open(f"collectives_rank{dist.rank()}.json", "w"))
    dist.teardown()
""")


@pytest.mark.slow
def test_two_gloo_ranks_hand_collectives_only_training_device_tensors(in_tmp):
    cfg = covering_experiment(QUANTIZERS["vq-ema-kmeans-restart"])
    (in_tmp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    (in_tmp / "rank.py").write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "rank.py", "exp.yaml"], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        rec = json.loads((in_tmp / f"collectives_rank{rank}.json").read_text())
        assert rec["violations"] == [], "\n".join(rec["violations"])
        assert {"all_reduce", "all_gather", "broadcast"} <= set(rec["calls"])
