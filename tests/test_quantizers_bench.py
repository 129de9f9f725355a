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
