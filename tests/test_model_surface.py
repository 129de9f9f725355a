"""The declared model surface (core.interfaces.TokenizerModel / TextTokenizerModel) is what plugins use.

- The Tokenizer satisfies it (members, types, call-compatible signatures), with and without a text
  tower; the checker itself catches a missing member, a renamed or extra required parameter, a wrong
  type.
- Every registered loss (constructed with ``model=`` and stepped through ``TrainStep``), the vtok
  distillation teacher's embedding, the token paths of ``core.tokenize`` and core.generate's prior
  file path run on a real small Tokenizer wrapped in :class:`surface_helpers.Strict`, which raises
  ``AttributeError`` for any member the surface does not declare, and give the same numbers as on
  the bare model (a plugin that silently falls back when a member is hidden differs). Every
  registered evaluator gets the same check in tests/test_evaluators_contract.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.evaluation import run_evaluators
from core.interfaces import Evaluator, TextTokenizerModel, TokenizerModel
from core.model import Tokenizer
from core.plugins import get_registry
from core.trainer import TrainStep, build
from surface_helpers import Strict, members, surface_problems
from test_losses_contract import CONTRACT as LOSS_CONTRACT
from test_losses_contract import batch_of, tiny

REG = get_registry()
TEXT = {"width": 32, "depth": 1, "heads": 2, "context_length": 16}


def terms_of(result) -> dict[str, torch.Tensor]:
    return dict(getattr(result, "terms", result))


def tokenizer(text: bool) -> Tokenizer:
    exp = tiny([{"type": "pixel"}], {"text": TEXT} if text else {})
    return Tokenizer(exp.model, exp.data.image_size, seed=0).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ---- the Tokenizer satisfies the surface; the checker catches departures ----------------------------

@pytest.mark.parametrize("text", [False, True], ids=["no_text", "text"])
def test_tokenizer_satisfies_the_declared_surface(text):
    model = tokenizer(text)
    assert isinstance(model, TokenizerModel)
    assert isinstance(model, TextTokenizerModel) is text  # clip_head exists only with a text tower
    assert surface_problems(model) == {}


DROP = object()


def test_the_surface_check_catches_departures():
    model = tokenizer(False)
    good = {n: getattr(model, n) for n in members(TokenizerModel)}
    good["forward"] = lambda images, texts=None: model(images)  # the surface's signature
    assert surface_problems(SimpleNamespace(**good), TokenizerModel) == {}
    cases = {
        "missing": ({"decode": DROP}, {"decode": "missing"}),
        "renamed parameter": ({"encode": lambda pixels: pixels}, {"encode": "argument 1 is 'pixels', not 'images'"}),
        "extra required parameter": ({"encode": lambda images, scale: images},
                                     {"encode": "requires 'scale', which the surface does not pass"}),
        "optional made required": ({"forward": lambda images, texts: images},
                                   {"forward": "requires 'texts', which is optional in the surface"}),
        "wrong type": ({"grid": [4, 4], "quantizer": nn.Linear(2, 2)},
                       {"grid": "list is not tuple[int, int]", "quantizer": "Linear is not <class 'core.interfaces.Quantizer'>"}),
    }
    for case, (over, want) in cases.items():
        ns = SimpleNamespace(**{k: v for k, v in {**good, **over}.items() if v is not DROP})
        assert surface_problems(ns, TokenizerModel) == want, case
    assert not isinstance(SimpleNamespace(**{k: v for k, v in good.items() if k != "decode"}), TokenizerModel)


def test_strict_wrapper_refuses_undeclared_members():
    model = tokenizer(True)
    strict = Strict.model(model)
    for reach in (lambda: strict.decoder, lambda: strict.logit_scale, lambda: strict.quantizer.codebook,
                  lambda: strict.encoder.blocks, lambda: strict.text.transformer, lambda: strict.text(["a"]),
                  lambda: strict.state_dict(), lambda: strict.training):
        with pytest.raises(AttributeError, match="not part of the declared surface"):
            reach()
    with pytest.raises(AttributeError):  # a declared method, not the module behind it
        strict.clip_head.proj
    with pytest.raises(AttributeError):
        strict.grid = (1, 1)
    assert strict.eval() is strict and strict.text is not None and Strict.model(tokenizer(False)).text is None
    x = images()
    assert torch.equal(strict.encode(x), model.encode(x)) and strict.quantizer.codebook_sizes == [32]

    class Reaching(Evaluator):  # a plugin using an undeclared member fails through the wrapper
        def update(self, batch, outputs):
            self.model.decoder

        def compute(self):
            return {}

    with pytest.raises(AttributeError, match="model.decoder"):
        run_evaluators(strict, [Reaching(None)], [{"image": x}])


# ---- every registered loss, the vtok teacher and the token paths on the strict model ----------------
# (every registered evaluator: tests/test_evaluators_contract.py)

@pytest.mark.parametrize("name", REG.names("losses"))
def test_loss_uses_only_the_declared_surface(name, tmp_path):
    if name not in LOSS_CONTRACT:
        pytest.fail(f"loss {name!r} has no CONTRACT entry (tests/test_losses_contract.py)")
    make, _ = LOSS_CONTRACT[name]
    built = build(tiny(*make(tmp_path)))
    batch = batch_of(built.train_set)

    def step(model):
        losses = []
        for loss in built.losses:  # rebuilt with this model, same initial weights
            torch.manual_seed(0)
            losses.append(type(loss)(loss.cfg, model=model))
        torch.manual_seed(1)
        total, outputs, _ = TrainStep(model, nn.ModuleList(losses), built.labels)(batch, 0)
        return total, {label: terms_of(loss(batch, outputs, 0)) for label, loss in zip(built.labels, losses)}

    strict_total, strict_terms = step(Strict.model(built.model))
    total, terms = step(built.model)
    assert torch.isfinite(strict_total) and torch.equal(strict_total, total)
    assert strict_terms.keys() == terms.keys()


@pytest.mark.parametrize("text", [False, True], ids=["no_text", "text"])
def test_vtok_distillation_teacher_uses_only_the_declared_surface(text):
    from plugins.losses.distill import _vtok_embed

    model, x = tokenizer(text), images()
    with torch.no_grad():
        assert torch.equal(_vtok_embed(Strict.model(model), x), _vtok_embed(model, x))


def test_token_paths_use_only_the_declared_surface():
    from core.tokenize import check_tokens_fit, decode_indices, encode_dataset, token_metadata

    model = tokenizer(False)
    strict = Strict.model(model)
    data = [{"image": img, "label": i % 3} for i, img in enumerate(images(10))]
    idx, labels = encode_dataset(strict, data, batch_size=4)
    ref, _ = encode_dataset(model, data, batch_size=4)
    assert torch.equal(idx, ref) and labels.tolist() == [i % 3 for i in range(10)]
    assert torch.equal(decode_indices(strict, idx, batch_size=4), decode_indices(model, idx, batch_size=4))
    meta = token_metadata(strict, "run")
    assert meta == token_metadata(model, "run")
    check_tokens_fit(strict, idx, meta, "tokens.safetensors")


def test_generation_prior_file_path_uses_only_the_declared_surface(tmp_path):
    """What core.generate does with a loaded tokenizer: train a prior on its tokens, save it, load it
    back (checked against the model's grid and head layout), sample and decode."""
    from plugins.evaluators.generation import Generation, GenerationConfig

    model = tokenizer(False)
    strict = Strict.model(model)
    gen = Generation(GenerationConfig(width=16, depth=1, heads=2, steps=2, batch_size=4, sample_batch_size=4))
    indices = model.encode(images(6))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    torch.manual_seed(0)
    bundle = gen.train_on(strict, indices, labels, ["a", "b"])
    loaded, _ = gen.load_prior(gen.save_prior(bundle, tmp_path / "prior.safetensors"), strict, gen.cfg.group_bits)
    got, got_idx = gen.sample_images(loaded, strict, labels[:4], 2.0, seed=3)
    ref, ref_idx = gen.sample_images(bundle, model, labels[:4], 2.0, seed=3)
    assert torch.equal(got_idx, ref_idx) and torch.equal(got, ref)
