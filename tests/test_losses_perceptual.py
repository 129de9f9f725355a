"""LPIPS (perceptual loss and lpips evaluator): local trunk weights, hand-computed reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from core.errors import ConfigError
from losses_helpers import images, tiny_exp, tiny_model
from plugins.evaluators.lpips import Lpips
from plugins.losses.perceptual import PerceptualLoss


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    """A small (random) torchvision AlexNet checkpoint standing in for the ImageNet weights."""
    torch.manual_seed(0)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    sd = {k: v for k, v in sd.items() if k.startswith("features.")}  # the trunk is all LPIPS reads
    path = tmp_path_factory.mktemp("w") / "alexnet.pth"
    torch.save(sd, path)
    return path, sd


def reference_lpips(sd, lins, x, y):
    """LPIPS by hand (Zhang et al. 2018, eq. 1): unit-normalise channels of 5 ReLU stages, squared
    difference, per-channel linear weights, spatial mean, sum over stages."""
    net = torchvision.models.alexnet(weights=None).features
    net.load_state_dict({k[len("features."):]: v for k, v in sd.items()})
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = [1, 4, 7, 9, 11]  # the ReLU outputs of AlexNet's five conv stages

    def feats(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(net):
            h = layer(h)
            if i in taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for fx, fy, w in zip(feats(x), feats(y), lins):
        total = total + F.conv2d((fx - fy) ** 2, w).mean(dim=(2, 3))
    return total.flatten()


def test_perceptual_loads_local_file_and_matches_hand_lpips(alex_file):
    path, sd = alex_file
    loss = PerceptualLoss(PerceptualLoss.Config(net="alex", weights=str(path)))
    assert torch.equal(loss.net.net.slice1[0].weight, sd["features.0.weight"])
    x, y = images(2, 64, seed=1), images(2, 64, seed=2)
    got = loss({}, {"images": x, "recon": y}, 0).terms["lpips"]
    lins = [lin.model[-1].weight for lin in loss.net.lins]
    ref = reference_lpips(sd, lins, y, x).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    assert loss({}, {"images": x, "recon": x}, 0).terms["lpips"].item() == pytest.approx(0.0, abs=1e-7)
    assert list(loss.parameters()) == []  # frozen network is not trained nor checkpointed


def test_perceptual_gradient_reaches_reconstruction(alex_file):
    loss = PerceptualLoss(PerceptualLoss.Config(net="alex", weights=str(alex_file[0])))
    y = images(2, 32, seed=3).requires_grad_()
    loss({}, {"images": images(2, 32), "recon": y}, 0).terms["lpips"].backward()
    assert y.grad.abs().sum() > 0


def test_perceptual_missing_file_fails_at_validation(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(ConfigError) as e:
        tiny_exp(losses=[{"type": "perceptual", "weights": str(missing)}])
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and msg.startswith("losses.0")


def test_default_path_is_the_torch_cache_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match=r"losses\.0.*checkpoints/vgg16-397923af\.pth"):
        tiny_exp(losses=[{"type": "perceptual"}])
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "vgg16-397923af.pth")
    tiny_exp(losses=[{"type": "perceptual"}])  # present: validation passes


def test_lpips_evaluator_same_rule(alex_file, tmp_path):
    path, _ = alex_file
    with pytest.raises(ConfigError, match="backbone weights not found"):
        tiny_exp(eval=[{"type": "lpips", "net": "alex", "weights": str(tmp_path / "x.pth")}])
    ev = Lpips(Lpips.Config(net="alex", weights=str(path)))
    model = tiny_model().eval()
    x = images(4)
    loader = [{"image": x[:2]}, {"image": x[2:]}]
    with torch.no_grad():
        got = ev.evaluate(model, loader)
        y = model(x)["recon"].clamp(-1, 1)
        ref = PerceptualLoss(PerceptualLoss.Config(net="alex", weights=str(path)))({}, {"images": x, "recon": y}, 0).terms["lpips"]
    assert set(got) == {"lpips_alex"} and got["lpips_alex"] == pytest.approx(ref.item(), rel=1e-5)
