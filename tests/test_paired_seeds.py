"""Paired design: seed s means the same data order, eval images and initial weights (of every
component whose config is shared) in every cell of a sweep (core.seeding, core.trainer.build)."""
from __future__ import annotations

import itertools

import torch

from conftest import tiny_experiment
from core import trainer
from core.config import validate
from core.seeding import component_seed


def _draw(seed: int, **over):
    exp = validate(tiny_experiment(seed=seed, **over))
    built = trainer.build(exp)
    batches = [b["image"].clone() for b in itertools.islice(trainer.train_loader(built.train_set, exp.train, exp.seed, 0), 3)]
    evals = torch.cat([b["image"] for b in trainer.eval_loader(built.eval_set, exp.train)])
    state = {k: v.clone() for k, v in built.model.state_dict().items()}
    after = torch.rand(4)  # the global stream after the build
    return batches, evals, state, after


def _same_shared(a, b, prefixes=("encoder.", "decoder.")):
    (ba, ea, sa, ra), (bb, eb, sb, rb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(ba, bb, strict=True))
    assert torch.equal(ea, eb)
    keys = [k for k in sa if k.startswith(prefixes)]
    assert keys and all(torch.equal(sa[k], sb[k]) for k in keys)
    assert torch.equal(ra, rb)


def test_unrelated_option_leaves_batches_eval_images_and_shared_weights_alone(in_tmp):
    base = _draw(3)
    # a bigger codebook draws more random numbers while the quantizer is built (before the decoder)
    bigger = _draw(3, **{"model.quantizer.codebook_size": 256})
    _same_shared(base, bigger)
    qa = {k: v.shape for k, v in base[2].items() if k.startswith("quantizer.")}
    qb = {k: v.shape for k, v in bigger[2].items() if k.startswith("quantizer.")}
    assert qa != qb  # the cells really differ in the quantizer
    # a loss weight: nothing of the model changes at all
    weighted = _draw(3, **{"losses.0.weight": 2.0})
    _same_shared(base, weighted, prefixes=("",))


def test_different_seeds_differ(in_tmp):
    a, b = _draw(3), _draw(4)
    assert not torch.equal(a[0][0], b[0][0])
    for part in ("encoder.", "decoder.", "quantizer."):
        key = next(k for k, v in a[2].items() if k.startswith(part) and v.is_floating_point() and v.numel() > 1)
        assert not torch.equal(a[2][key], b[2][key]), key
    assert not torch.equal(a[3], b[3])


def test_same_seed_same_build(in_tmp):
    a, b = _draw(5), _draw(5)
    _same_shared(a, b, prefixes=("",))


def test_component_seed_depends_on_seed_and_path_only():
    assert component_seed(0, "model.encoder") == component_seed(0, "model.encoder")
    assert len({component_seed(s, p) for s in range(3) for p in ("model.encoder", "model.decoder", "losses.gan")}) == 9
    assert 0 <= component_seed(2**40, "x") < 2**63
