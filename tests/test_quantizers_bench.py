"""The quantizer benchmark CLI (``python -m core.bench quantizers``)."""
from __future__ import annotations

import json

import pytest

from core import bench


def test_every_case_names_registered_quantizers():
    from core.plugins import get_registry

    names = get_registry().names("quantizers")
    for case in bench.CASES:
        assert case.impls[0].kind == "vtok"  # ratios are relative to vtok
        for impl in case.impls:
            if impl.kind == "vtok":
                assert impl.spec["type"] in names


def test_naive_reference_matches_plugin_indices():
    """The naive VQ the benchmark compares against computes the same assignment."""
    import torch

    from plugins.quantizers.vq import MCQ, MCQConfig

    torch.manual_seed(0)
    ref = bench._naive({"fn": "vq", "n": 2, "k": 32, "d": 4, "cosine": True})
    cb = ref.codebook
    q = MCQ(MCQConfig(codes_per_token=2, codebook_size=32, code_dim=4))
    q.codebook.data = cb.detach().clone()
    z = torch.randn(2, 5, 8)
    assert torch.allclose(ref(z)[0], q(z).quantized, atol=1e-6)


@pytest.mark.slow
def test_cli_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["quantizers", "--tokens", "64", "--reps", "1", "--threads", "1", "--only", "fsq", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["impl"] == "vtok fsq" and rows[0]["ms"] > 0


def test_naive_rq_and_lfq_references_match_the_plugins():
    """The shared brute-force references (core/reference_quantizers.py) give the plugins' outputs:
    RQ with copied codebooks, LFQ's sign code and its entropy + commitment terms (0.1 / 0.25)."""
    import torch

    from core import reference_quantizers as R
    from plugins.quantizers.lfq import LFQ, LFQConfig
    from plugins.quantizers.rq import RQ, RQConfig

    torch.manual_seed(0)
    ref = R.naive({"fn": "rq", "depth": 3, "k": 16, "d": 8})
    q = RQ(RQConfig(codes_per_token=3, codebook_size=16, code_dim=8))
    q.codebook.data = ref.codebook.detach().clone()
    z = torch.randn(2, 5, 8)
    assert torch.allclose(ref(z)[0], q(z).quantized, atol=1e-5)
    lref = R.naive({"fn": "lfq", "d": 6})
    lq = LFQ(LFQConfig(code_dim=6))
    z = torch.randn(2, 7, 6)
    out, (quantized, loss) = lq(z), lref(z)
    assert torch.equal(quantized, out.quantized)
    assert loss.item() == pytest.approx((0.1 * out.losses["entropy"] + 0.25 * out.losses["commitment"]).item(), rel=1e-4)
