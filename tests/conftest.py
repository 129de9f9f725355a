"""Shared fixtures: every test that runs training works in its own temporary directory."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """chdir into a fresh directory (runs/ and mlflow.db land there) with no inherited MLflow URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def tiny_experiment(**over) -> dict:
    """A seconds-long config (16 px shapes, 4x4 tokens) as a plain dict; overrides by dotted key."""
    exp = {
        "name": "tiny",
        "seed": 0,
        "data": {"type": "shapes", "image_size": 16, "train_size": 64},
        "model": {
            "encoder": {"type": "conv", "width": 8, "downsample": 4},
            "quantizer": {"type": "vq", "codebook_size": 32, "code_dim": 8},
            "decoder": {"type": "conv", "width": 8},
        },
        "losses": [{"type": "pixel"}, {"type": "quantizer"}],
        "train": {"steps": 6, "batch_size": 8, "optimizer": {"lr": 1e-3}, "eval_size": 16, "eval_batch_size": 8, "progress": False, "log_every": 2},
        "eval": [{"type": "psnr_ssim"}],
        "tracking": {"enabled": False},
    }
    from core.config import set_dotted

    for key, value in over.items():
        set_dotted(exp, key.split("."), value)
    return exp
