"""Evaluators against hand-made models and hand-computed numbers."""
from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.interfaces import Dataset, DatasetConfig, Encoder, Quantizer, QuantizerOutput, TextTokenizerModel, TokenizerModel
from plugins.evaluators import fd as fd_mod
from plugins.evaluators.fd import Fd, FdConfig, frechet_distance
from plugins.evaluators.linear_probe import LinearProbe, LinearProbeConfig, probe_accuracy
from plugins.evaluators.psnr_ssim import PsnrSsim, PsnrSsimConfig, psnr, ssim
from plugins.evaluators.usage import Usage, UsageConfig, code_counts, usage_stats
from plugins.evaluators.zero_shot import ZeroShot, ZeroShotConfig
from surface_helpers import Strict, surface_problems


class ToyConfig(DatasetConfig):
    type: str = "toy"
    n: int = 200
    n_classes: int = 10


class Toy(Dataset):
    """Images whose pixel (0, 0, 0) encodes the label (x = label / 100); a smooth random pattern elsewhere."""

    Config = ToyConfig
    templates = ["a {}.", "a photo of a {}."]
    attributes = {"parity": ["even", "odd"]}
    attribute_templates = {"parity": ["an {} number."]}

    def __init__(self, cfg, split="eval", seed=0):
        self.cfg, self.split, self.seed = cfg, split, seed
        self.class_names = [f"class{c}" for c in range(cfg.n_classes)]
        g = torch.Generator().manual_seed(seed + (split == "train"))
        self.labels = torch.randint(cfg.n_classes, (cfg.n,), generator=g)
        self.images = torch.nn.functional.interpolate(torch.rand(cfg.n, 3, 4, 4, generator=g) * 1.6 - 0.8, size=(16, 16), mode="bilinear")
        self.images[:, 0, 0, 0] = self.labels / 100

    def __len__(self):
        return self.cfg.n

    def __getitem__(self, i):
        y = int(self.labels[i])
        return {"image": self.images[i], "text": "", "label": y, "label_parity": y % 2}


class HandEncoder(Encoder):
    """One token per image: the row of ``basis`` of the label read from pixel (0, 0, 0)."""

    def __init__(self, basis):
        super().__init__()
        self.basis, self.out_dim, self.downsample = basis, basis.shape[1], 16

    def forward(self, images):
        labels = (images[:, 0, 0, 0] * 100).round().long()
        return self.basis[labels][:, None], (1, 1)


class HandQuantizer(Quantizer):
    """One codebook, the rows of ``basis`` (orthonormal): the code of largest inner product."""

    def __init__(self, basis):
        super().__init__()
        self.basis = basis
        self.codes_per_token, self.codebook_sizes, self.bits_per_token = 1, [len(basis)], math.log2(len(basis))

    def quantize(self, z):
        indices = (z @ self.basis.T).argmax(-1, keepdim=True)
        return QuantizerOutput(self.indices_to_codes(indices), indices)

    def indices_to_codes(self, indices):
        return self.basis[indices[..., 0]]


class HandText(nn.Module):
    """Prompts naming ``class<c>`` -> basis row c; ``even`` / ``odd`` -> the mean of those classes' rows."""

    def __init__(self, basis):
        super().__init__()
        self.basis = basis

    def forward(self, prompts):
        out = []
        for p in prompts:
            if "even" in p or "odd" in p:
                c = 0 if "even" in p else 1
                out.append(self.basis[c::2].mean(0))  # parity: the mean of the class embeddings
            else:
                out.append(self.basis[int(p.split("class")[1][0])])
        return nn.functional.normalize(torch.stack(out), dim=-1)


class HandModel(nn.Module):
    """The declared model surface (core.interfaces.TextTokenizerModel) by hand: encode reads the label
    from pixel (0,0,0); codes, image and text embeddings are rows of an orthonormal matrix.

    ``shuffled``: image embeddings ignore the label (random per image), so accuracy is chance.
    ``noise``: reconstructions are the input plus Gaussian noise of this std (for FD).
    """

    def __init__(self, n_classes=10, dim=16, shuffled=False, noise=0.0):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))[0][:n_classes]
        self.encoder, self.quantizer, self.text = HandEncoder(basis), HandQuantizer(basis), HandText(basis)
        self.spec = SimpleNamespace(quantizer=SimpleNamespace(latent_dim=dim))
        self.image_size, self.grid = 16, (1, 1)
        self.shuffled, self.noise = shuffled, noise
        self.gen = torch.Generator().manual_seed(1)

    def project_in(self, latent):
        return latent

    def project_out(self, zq):
        return zq

    def encode(self, images):
        return self.quantizer.encode(self.project_in(self.encoder(images)[0]))  # (B, 1, 1): the label

    def decode(self, indices):
        images = torch.zeros(len(indices), 3, self.image_size, self.image_size)
        images[:, 0, 0, 0] = indices[:, 0, 0] / 100  # what encode reads back
        return images

    def discrete_latent(self, images):
        return self.quantizer.indices_to_codes(self.encode(images))

    def clip_head(self, tokens):
        return nn.functional.normalize(tokens.mean(dim=1), dim=-1)

    def image_embed_from_indices(self, indices):
        if self.shuffled:
            return nn.functional.normalize(torch.randn(indices.shape[0], self.quantizer.basis.shape[1], generator=self.gen), dim=-1)
        return self.clip_head(self.project_out(self.quantizer.indices_to_codes(indices)))

    def encode_text(self, texts):
        return self.text(texts)

    def forward(self, images, texts=None):
        out = {"recon": images + self.noise * torch.randn(images.shape, generator=self.gen)}
        if texts is not None:
            out["text_embed"], out["logit_scale"] = self.encode_text(texts), torch.tensor(math.log(100.0))
        return out


def test_hand_model_satisfies_the_declared_model_surface():
    """The hand-made model has every member of the surface, with call-compatible signatures, and the
    evaluators run on it when it exposes nothing else (surface_helpers.Strict)."""
    model = HandModel()
    assert isinstance(model, TokenizerModel) and isinstance(model, TextTokenizerModel)
    assert surface_problems(model, TextTokenizerModel) == {}
    x = Toy(ToyConfig()).images[:8]
    assert torch.equal(model.encode(model.decode(model.encode(x))), model.encode(x))  # decode: the images encode reads back
    strict = Strict.model(model)
    assert ZeroShot(ZeroShotConfig(attributes=["parity"])).evaluate(strict, loader())["zero_shot_parity_top1"] == 100.0
    assert LinearProbe(LinearProbeConfig()).evaluate(strict, loader(n=300))["linear_probe_top1"] == 100.0
    assert Usage(UsageConfig()).evaluate(strict, loader())["usage"] == Usage(UsageConfig()).evaluate(model, loader())["usage"]


def loader(n=200, n_classes=10, batch_size=64, seed=0):
    ds = Toy(ToyConfig(n=n, n_classes=n_classes), "eval", seed)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size)


# ---- zero-shot --------------------------------------------------------------------------------

def test_zero_shot_matching_model_is_perfect():
    out = ZeroShot(ZeroShotConfig(attributes=["parity"])).evaluate(HandModel(), loader())
    assert out == {"zero_shot_top1": 100.0, "zero_shot_top5": 100.0, "zero_shot_parity_top1": 100.0}


def test_zero_shot_shuffled_model_is_chance():
    out = ZeroShot(ZeroShotConfig()).evaluate(HandModel(shuffled=True), loader(n=2000, batch_size=500))
    assert abs(out["zero_shot_top1"] - 10) < 3 and abs(out["zero_shot_top5"] - 50) < 5


def test_zero_shot_unknown_attribute():
    with pytest.raises(ConfigError, match="no attribute 'size'"):
        ZeroShot(ZeroShotConfig(attributes=["size"])).evaluate(HandModel(), loader())


def test_zero_shot_needs_text():
    assert ZeroShot.needs == frozenset({"text"})


# ---- usage ------------------------------------------------------------------------------------

def test_usage_hand_count():
    # K = 2 sub-codebooks of size 4; 8 tokens
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3], [1, 1], [1, 1], [1, 2], [1, 3]])
    counts = code_counts(idx[None], [4, 4])
    assert counts[0].tolist() == [4, 4, 0, 0] and counts[1].tolist() == [0, 4, 2, 2]
    out = usage_stats(counts)
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out["usage_0"] == 50.0 and out["usage_1"] == 75.0 and out["usage"] == 62.5 and out["usage_min"] == 50.0
    assert out["dead_codes"] == 3.0
    assert math.isclose(out["perplexity_0"], 2.0) and math.isclose(out["perplexity_1"], math.exp(h1))
    assert math.isclose(out["bits_used"], 1.0 + 1.5) and out["bits_capacity"] == 4.0
    # usage_freq: frequency must exceed freq_threshold / size (UniTok: 0.01 / K)... here 1.2 / 4 = 0.3:
    # only 0.5-frequency codes count
    assert out["usage_freq_1"] == 75.0 and usage_stats(counts, freq_threshold=1.2)["usage_freq_1"] == 25.0


def test_usage_evaluator_accumulates_batches():
    out = Usage(UsageConfig()).evaluate(HandModel(), loader(n=200, batch_size=7))
    labels = Toy(ToyConfig(n=200), "eval", 0).labels
    assert out["usage"] == 100.0 * len(labels.unique()) / 10
    p = torch.bincount(labels, minlength=10).double() / 200
    assert math.isclose(out["perplexity"], math.exp(float(-(p[p > 0] * p[p > 0].log()).sum())), rel_tol=1e-9)


# ---- linear probe -----------------------------------------------------------------------------

def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    centres = rng.normal(size=(4, 8)) * 5
    x = centres[y] + rng.normal(size=(400, 8))
    assert probe_accuracy(x, y, LinearProbeConfig())["linear_probe_top1"] == 100.0
    chance = probe_accuracy(rng.normal(size=(2000, 8)), rng.integers(0, 4, 2000), LinearProbeConfig())
    assert abs(chance["linear_probe_top1"] - 25) < 5


def test_linear_probe_evaluator_on_discrete_features():
    out = LinearProbe(LinearProbeConfig()).evaluate(HandModel(), loader(n=300))
    assert out["linear_probe_top1"] == 100.0


# ---- psnr / ssim ------------------------------------------------------------------------------

def test_psnr_ssim_hand_values():
    x = torch.full((2, 3, 16, 16), 0.5)
    y = x + 0.1
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-4)  # 10 log10(1 / 0.01)
    c1 = 0.01**2  # constant images: only SSIM's luminance term differs from 1
    expect = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert torch.allclose(ssim(x, y), torch.full((2,), expect, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_psnr_ssim_evaluator():
    out = PsnrSsim(PsnrSsimConfig()).evaluate(HandModel(noise=0.0), loader(n=20))
    assert out["psnr"] == 100.0 and abs(out["ssim"] - 1) < 1e-6  # mse clamped at 1e-10


# ---- Fréchet distance -------------------------------------------------------------------------

def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 3, generator=g)
    assert frechet_distance(a, a) < 1e-8
    # shifted by d and scaled by s: FD = |d|^2 + sum (1 - s)^2 var
    b = a * 2 + torch.tensor([1.0, 0.0, 0.0])
    a64, b64 = a.double(), b.double()
    shift = (b64.mean(0) - a64.mean(0)).pow(2).sum().item()
    var = a64.var(0).sum().item()
    assert math.isclose(frechet_distance(a, b), shift + var * (2 - 1) ** 2, rel_tol=1e-6)


def _fd_cfg(tmp_path, **kw):
    return FdConfig(extractor="reference", cache_dir=str(tmp_path), reference=dict(width=8, steps=3, batch_size=16), **kw)


def test_fd_reference_zero_on_itself_monotone_in_noise_and_cached(tmp_path):
    cfg = _fd_cfg(tmp_path)
    vals = [Fd(cfg).evaluate(HandModel(noise=s), loader(n=128)) for s in (0.0, 0.05, 0.2, 0.6)]
    assert all(set(v) == {"fd_refnet"} for v in vals)
    fds = [v["fd_refnet"] for v in vals]
    assert abs(fds[0]) < 1e-6 and fds[0] < fds[1] < fds[2] < fds[3], fds
    assert len(list((tmp_path / "fd_reference").glob("toy-*.safetensors"))) == 1
    with mock.patch.object(fd_mod, "train_refnet", side_effect=AssertionError("retrained")):
        assert Fd(cfg).evaluate(HandModel(noise=0.2), loader(n=128))["fd_refnet"] == pytest.approx(fds[2], rel=0.05)


def test_fd_features_in_fp32_under_bf16_autocast_and_head_wrapper(tmp_path):
    """The trainer evaluates under autocast and wraps iterable eval sets: the FD must not change."""

    class Head(torch.utils.data.IterableDataset):  # like the trainer's head-of-stream wrapper
        def __init__(self, ds):
            self.dataset = ds

        def __iter__(self):
            return (self.dataset[i] for i in range(64))

    cfg = _fd_cfg(tmp_path)
    ref = Fd(cfg).evaluate(HandModel(noise=0.2), loader(n=64))["fd_refnet"]
    head = torch.utils.data.DataLoader(Head(Toy(ToyConfig(n=64))), batch_size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Fd(cfg).evaluate(HandModel(noise=0.2), head)["fd_refnet"]
    assert got == pytest.approx(ref, rel=1e-4)


def test_fd_auto_without_inception_is_never_rfid(tmp_path, monkeypatch):
    monkeypatch.delenv("VTOK_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = _fd_cfg(tmp_path).model_copy(update={"extractor": "auto"})
    assert set(Fd(cfg).evaluate(HandModel(), loader(n=32))) == {"fd_refnet"}


def test_fd_inception_missing_weights_names_the_file(tmp_path):
    cfg = FdConfig(extractor="inception", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="missing.pth not found.*weights-inception-2015-12-05") as e:
        Fd(cfg).evaluate(HandModel(), loader(n=8))
    assert "\n" not in str(e.value)


def _fake_inception_weights(path):
    """A file of torch-fidelity's format for FeatureExtractorInceptionV3 (random values, 23.8M of them)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fi

    with mock.patch.object(fi.torch, "load", return_value={}), mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict"):
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save({k: v.half() for k, v in net.state_dict().items()}, path)  # fp16: half the bytes; loads into fp32


def test_fd_inception_weights_found_in_cache_dir_and_used(tmp_path, monkeypatch):
    """Fast: the file is found and handed to torch-fidelity; uint8 images go in; the metric is rfid."""
    (tmp_path / fd_mod.INCEPTION_FILE).write_bytes(b"stub")
    seen = {}

    class FakeInception(nn.Module):
        def __init__(self, name, features, feature_extractor_weights_path):
            super().__init__()
            seen["path"], seen["features"] = feature_extractor_weights_path, features

        def forward(self, x):
            assert x.dtype == torch.uint8
            return (x.float().flatten(1)[:, :8],)

    from torch_fidelity import feature_extractor_inceptionv3 as fi
    monkeypatch.setattr(fi, "FeatureExtractorInceptionV3", FakeInception)
    cfg = FdConfig(cache_dir=str(tmp_path))
    same = Fd(cfg).evaluate(HandModel(noise=0.0), loader(n=32))
    noisy = Fd(cfg).evaluate(HandModel(noise=0.3), loader(n=32))
    assert seen == {"path": str(tmp_path / fd_mod.INCEPTION_FILE), "features": ["2048"]}
    assert set(same) == {"rfid"} and abs(same["rfid"]) < 1e-6 < noisy["rfid"]


@pytest.mark.slow
def test_fd_inception_with_self_made_weights(tmp_path):
    """The real torch-fidelity Inception-v3 loads a self-made weights file and runs (about 1-2 minutes)."""
    _fake_inception_weights(tmp_path / fd_mod.INCEPTION_FILE)
    cfg = FdConfig(extractor="inception", cache_dir=str(tmp_path))
    same = Fd(cfg).evaluate(HandModel(noise=0.0), loader(n=4, batch_size=4))
    noisy = Fd(cfg).evaluate(HandModel(noise=0.5), loader(n=4, batch_size=4))
    assert set(same) == {"rfid"} and noisy["rfid"] > 0 and abs(same["rfid"]) < 1e-3 * noisy["rfid"]


def test_mean_image_baseline_psnr_hand_value():
    from plugins.evaluators.psnr_ssim import mean_image_psnr

    # two images, all-black and all-white in [0, 1]: the mean image is 0.5 grey, MSE 0.25 -> 10 log10(4) dB
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    loader = [{"image": images[:1]}, {"image": images[1:]}]
    assert mean_image_psnr(loader) == pytest.approx(10 * math.log10(4.0))
