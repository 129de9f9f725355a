"""The ``init`` field of UniTok's projections and decoders: ``unitok`` (default) or ``torch``.

``unitok`` is what FoundationVision/UniTok does after building the model (``models/__init__.py``,
``build_unitok`` -> ``init_weights(module, args.vae_init=-0.5)``, applied to the decoder and both
attention projections, not to the encoder): every Linear weight truncated normal with std 0.02
(``torch.nn.init.trunc_normal_`` with its default bounds +-2), every conv weight Xavier-normal with
gain 0.5, every Linear/conv bias 0, every LayerNorm/GroupNorm weight 1 and bias 0.
``torch`` keeps the default initialisation of each layer (what vtok did before).
Free parameters that are not layers (attention q/v biases, positional embeddings) are untouched.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

#: the config field type of ``init``
Init = Literal["unitok", "torch"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def unitok_init_(module: nn.Module, conv_gain: float = 0.5) -> None:
    """Re-initialise every layer of ``module`` in place the way UniTok's ``init_weights`` does."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, _CONVS):
            nn.init.xavier_normal_(m.weight, gain=conv_gain)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, _NORMS):
            if m.weight is not None:
                nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def apply_init(module: nn.Module, init: str) -> None:
    """``init: unitok`` -> :func:`unitok_init_`; ``torch`` -> leave the layers' defaults."""
    if init == "unitok":
        unitok_init_(module)
