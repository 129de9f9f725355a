"""PSNR and SSIM of reconstructions, on images mapped to [0, 1]."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator


class PsnrSsimConfig(ComponentConfig):
    type: Literal["psnr_ssim"] = "psnr_ssim"
    # also report psnr_mean_image: the PSNR of predicting every image by the eval set's per-pixel
    # mean image (the trivial baseline a tokenizer must clearly beat; costs a second data pass)
    baseline: bool = False


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB for images in [0, 1] (10 log10(1 / MSE), MSE floored at 1e-10: 100 dB)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size) - size // 2).float() ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03, data range 1),
    averaged over channels; the window shrinks to the image for small images; 'valid' borders.
    Computed in float64: the variances E[x^2] - E[x]^2 cancel catastrophically in float32 (an error
    of ~1e-6 against the 9e-4 constant C2 moves SSIM in the 4th digit)."""
    x, y = x.double(), y.double()
    size = min(size, x.shape[-1], x.shape[-2])
    c = x.shape[1]
    g = _gaussian(size, sigma).to(x)
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    f = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


class PsnrSsim(Evaluator):
    """Reconstruction quality: ``psnr`` (dB) and ``ssim``, means over the eval set."""

    Config = PsnrSsimConfig

    @classmethod
    def declared_metrics(cls, cfg: PsnrSsimConfig) -> dict[str, str]:
        return {"psnr": "higher", "ssim": "higher", **({"psnr_mean_image": "higher"} if cfg.baseline else {})}

    def begin(self, model, loader) -> None:
        self.loader, self.tot_p, self.tot_s, self.n = loader, 0.0, 0.0, 0

    def update(self, batch, outputs) -> None:
        x01, y01 = (outputs["images"] + 1) / 2, (outputs["recon"] + 1) / 2
        self.tot_p += psnr(x01, y01).sum().item()
        self.tot_s += ssim(x01, y01).sum().item()
        self.n += x01.shape[0]

    def compute(self) -> dict[str, float]:
        out = {"psnr": self.tot_p / max(self.n, 1), "ssim": self.tot_s / max(self.n, 1)}
        if self.cfg.baseline and self.n:
            out["psnr_mean_image"] = mean_image_psnr(self.loader)  # a data pass, no model
        return out


def mean_image_psnr(loader) -> float:
    """Mean PSNR of the constant prediction 'the per-pixel mean image of the set'."""
    total = None
    n = 0
    for batch in loader:
        x = (batch["image"].double() + 1) / 2
        total = x.sum(0) if total is None else total + x.sum(0)
        n += x.shape[0]
    mean = (total / n)[None]
    return sum(psnr((b["image"].double() + 1) / 2, mean.expand_as(b["image"])).sum().item() for b in loader) / n


@hookimpl
def register_evaluators(register):
    register("psnr_ssim", PsnrSsim)
