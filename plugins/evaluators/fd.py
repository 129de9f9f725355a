"""Fréchet distance between originals and reconstructions in a declared feature space.

FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the eval set's features (Heusel et
al. 2017, Eq. 6), computed with torch-fidelity's statistics functions.

``rfid``: torch-fidelity's Inception-v3 (the 2015-12-05 TensorFlow weights converted to PyTorch,
file ``weights-inception-2015-12-05-6726825d.pth``), 2048-d pool features of uint8 images resized
inside to 299 px, as UniTok reports it. The weights are never downloaded: they are read from
``weights``, else ``$VTOK_INCEPTION_WEIGHTS``, else the cache dir, else torch hub's
checkpoint dir (where torch-fidelity would have put them).

``fd_refnet``: when no Inception weights are available (``extractor: auto``) or asked for
(``extractor: reference``): the global-pooled features of a small CNN classifier that vtok trains
once on the dataset's TRAIN split labels and caches under ``<cache_dir>/fd_reference/`` keyed by
a hash of the dataset config, seed and classifier config. Never reported as ``rfid``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from core.errors import ConfigError
from core.hookspecs import hookimpl
from core.interfaces import ComponentConfig, Evaluator, VocabModel
from plugins.evaluators._common import base_dataset, device_of, no_autocast

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
REFNET_VERSION = 1  # bump when RefNet or its training changes: invalidates cached networks


class RefNetConfig(VocabModel):
    """The reference CNN of ``fd_refnet`` and its training (once per dataset, cached)."""

    width: int = Field(16, gt=0)  # channels of the first stage (x2, x4, x4 after)
    image_size: int = Field(32, ge=8)  # images are resized to this side
    steps: int = Field(200, gt=0)  # Adam steps training it
    batch_size: int = Field(64, gt=0)  # its batch size
    lr: float = Field(2e-3, gt=0)  # its learning rate


class FeatureSpaceConfig(ComponentConfig):
    """The feature space of a Fréchet distance (shared with the generation evaluator's gFD)."""

    # auto: rfid when Inception weights are found, else fd_refnet; inception: rfid or fail; reference: fd_refnet
    extractor: Literal["auto", "inception", "reference"] = "auto"
    renamed = {f"ref_{k}": f"reference.{k}" for k in ("width", "image_size", "steps", "batch_size", "lr")}
    weights: Optional[str] = None  # local Inception-v3 file weights-inception-2015-12-05-6726825d.pth
    cache_dir: Optional[str] = None  # default: $VTOK_CACHE or ./.vtok_cache
    reference: RefNetConfig = Field(default_factory=RefNetConfig)  # the fd_refnet extractor


class FdConfig(FeatureSpaceConfig):
    type: Literal["fd"] = "fd"


def cache_dir(cfg: FdConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("VTOK_CACHE") or ".vtok_cache")


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD between the Gaussians fitted to two ``(N, D)`` feature sets (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    sa = fid_features_to_statistics(a.detach().double().cpu())
    sb = fid_features_to_statistics(b.detach().double().cpu())
    return float(fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID])


def to_uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---- Inception --------------------------------------------------------------------------------

def find_inception_weights(cfg: FdConfig) -> Optional[Path]:
    if cfg.weights:
        return Path(cfg.weights)
    cands = [os.environ.get("VTOK_INCEPTION_WEIGHTS"), cache_dir(cfg) / INCEPTION_FILE,
             Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    return next((Path(c) for c in cands if c and Path(c).is_file()), None)


def inception(path: Path) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if not path.is_file():
        raise ConfigError("eval.fd.weights", f"{path} not found: rfid needs torch-fidelity's Inception-v3 "
                          f"weights file {INCEPTION_FILE} (no download here)")
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


# ---- the reference network --------------------------------------------------------------------

class RefNet(nn.Module):
    """Four 3x3 conv stages (GroupNorm, SiLU; strides 1, 2, 2, 2) -> global mean pool -> linear."""

    def __init__(self, width: int, n_classes: int, image_size: int) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], n_classes)
        self.image_size = image_size

    def features(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def refnet_key(ds, cfg: FdConfig) -> str:
    spec = {"data": ds.cfg.model_dump(mode="json"), "seed": ds.seed, "version": REFNET_VERSION,
            **{f"ref_{k}": v for k, v in cfg.reference.model_dump().items()}}  # the old flat names: caches stay valid
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _train_batches(ds, batch_size: int, seed: int):
    """Endless labelled batches of the dataset's train split (reshuffled per pass for map-style)."""
    train = type(ds)(ds.cfg, split="train", seed=ds.seed)
    iterable = isinstance(train, torch.utils.data.IterableDataset)
    g = torch.Generator().manual_seed(seed)
    while True:
        n = 0
        for batch in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=not iterable, generator=None if iterable else g):
            n += 1
            yield batch
        if n == 0:
            raise ConfigError("eval.fd", f"the train split of data '{ds.cfg.type}' is empty: the reference extractor cannot train")


def train_refnet(ds, cfg: FdConfig) -> RefNet:
    if not ds.class_names:
        raise ConfigError("eval.fd", f"the reference extractor trains on class labels and data '{ds.cfg.type}' has none; "
                          f"give Inception weights (eval.fd.weights) instead")
    torch.manual_seed(0)
    ref = cfg.reference
    net = RefNet(ref.width, len(ds.class_names), ref.image_size)
    opt = torch.optim.Adam(net.parameters(), lr=ref.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ref.steps)
    batches = _train_batches(ds, ref.batch_size, seed=0)
    for _ in range(ref.steps):
        batch = next(batches)
        labels = torch.as_tensor(batch["label"])
        keep = labels >= 0
        if not keep.any():
            continue
        loss = F.cross_entropy(net(batch["image"][keep]), labels[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def load_or_train_refnet(ds, cfg: FdConfig) -> RefNet:
    from safetensors.torch import load_file, save_file

    path = cache_dir(cfg) / "fd_reference" / f"{ds.cfg.type}-{refnet_key(ds, cfg)}.safetensors"
    if path.is_file():
        net = RefNet(cfg.reference.width, len(ds.class_names), cfg.reference.image_size)
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    with torch.enable_grad(), no_autocast(torch.device("cpu")):  # evaluators run under no_grad (and maybe autocast)
        net = train_refnet(ds, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
    return net


# ---- the feature space ------------------------------------------------------------------------

def extractor(cfg: FeatureSpaceConfig, ds) -> tuple[str, nn.Module, bool]:
    """(space: ``inception`` or ``refnet``, feature module, wants uint8 input) for dataset ``ds``."""
    weights = find_inception_weights(cfg) if cfg.extractor != "reference" else None
    if cfg.extractor == "inception" or weights is not None:
        return "inception", inception(weights or cache_dir(cfg) / INCEPTION_FILE), True
    return "refnet", load_or_train_refnet(ds, cfg), False


def feature_fn(net: nn.Module, uint8: bool, device: torch.device):
    """images in [-1, 1] -> ``(B, D)`` float features in the extractor's space (fp32, no autocast)."""
    net = net.to(device)

    def features(images: Tensor) -> Tensor:
        with no_autocast(device):
            f = net(to_uint8(images)) if uint8 else net.features(images.float().clamp(-1, 1))
        return (f[0] if isinstance(f, tuple) else f).float()

    return features


# ---- the evaluator ----------------------------------------------------------------------------

class Fd(Evaluator):
    """Fréchet distance of reconstructions to originals: ``rfid`` (Inception-v3) or ``fd_refnet``."""

    Config = FdConfig

    def extractor(self, loader) -> tuple[str, nn.Module, bool]:
        """(metric name, feature function module, wants uint8 input)."""
        space, net, uint8 = extractor(self.cfg, base_dataset(loader))
        return ("rfid" if space == "inception" else "fd_refnet"), net, uint8

    @classmethod
    def declared_metrics(cls, cfg: FdConfig) -> dict[str, str]:
        return {name: "lower" for name in space_names(cfg, "rfid", "fd_refnet")}

    def begin(self, model, loader) -> None:
        """Loads the feature network (training the reference one once per dataset when needed)."""
        self.name, net, self.uint8 = self.extractor(loader)
        self.device = device_of(model)
        self.feats = feature_fn(net, self.uint8, self.device)
        self.real, self.fake = [], []

    def update(self, batch, outputs) -> None:
        self.real.append(self.feats(outputs["images"]))
        self.fake.append(self.feats(outputs["recon"]))

    def compute(self) -> dict[str, float]:
        return {self.name: frechet_distance(torch.cat(self.real), torch.cat(self.fake))}


def space_names(cfg: FeatureSpaceConfig, inception_name: str, refnet_name: str) -> list[str]:
    """The metric names ``cfg.extractor`` can yield (``auto``: either, by the weights found at run time)."""
    return {"inception": [inception_name], "reference": [refnet_name]}.get(cfg.extractor, [inception_name, refnet_name])


@hookimpl
def register_evaluators(register):
    register("fd", Fd)
