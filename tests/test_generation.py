"""The generation evaluator: head layouts, the prior's samplers, known answers, core.generate."""
from __future__ import annotations

import math

import pytest
import torch

from core.interfaces import Dataset, DatasetConfig
from core.plugins import get_registry
from plugins.evaluators.fd import extractor, feature_fn, frechet_distance
from plugins.evaluators.generation import (
    Bundle, Generation, GenerationConfig, HeadLayout, Prior, draw, group_radices, guided, sample, train_prior,
)

# ---- head layouts ------------------------------------------------------------------------------


def _quantizer(name: str, **kw):
    cls = get_registry().get("quantizers", name)
    return cls(cls.Config(**kw))


LAYOUTS = [  # (quantizer, config, head sizes per slot)
    ("vq", {"codebook_size": 16384, "code_dim": 8}, [[16384]]),
    ("mcq", {"codes_per_token": 8, "codebook_size": 128, "code_dim": 4}, [[128]] * 8),
    ("rq", {"codes_per_token": 4, "codebook_size": 64, "code_dim": 8}, [[64]] * 4),
    ("lfq", {"code_dim": 18}, [[256, 256, 4]]),
    ("bsq", {"code_dim": 18, "entropy_group_size": 9}, [[256, 256, 4]]),
    ("gq", {"codes_per_token": 16, "code_dim": 8}, [[256]] * 16),  # UniWeTok's 2^128 codebook
    ("gq", {"codes_per_token": 4, "code_dim": 6}, [[64]] * 4),
    ("fsq", {"levels": [8, 5, 5, 5]}, [[8, 5, 5, 5]]),
]


@pytest.mark.parametrize("name,kw,slots", LAYOUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LAYOUTS)])
def test_head_layout_of_each_quantizer(name, kw, slots):
    q = _quantizer(name, **kw)
    layout = HeadLayout.for_quantizer(q)
    assert layout.slots == slots
    assert layout.bits == pytest.approx(q.bits_per_token)
    assert max(layout.sizes) <= max(256, *q.codebook_sizes) if name in ("vq", "mcq", "rq") else max(layout.sizes) <= 256


@pytest.mark.parametrize("name", [n for n in get_registry().names("quantizers")])
def test_every_quantizer_round_trips_indices_through_head_targets(name):
    q = _quantizer(name)
    if q.continuous:
        pytest.skip("continuous: no indices")
    radices = q.index_radices()
    assert [math.prod(r) for r in radices] == list(q.codebook_sizes)
    layout = HeadLayout.for_quantizer(q)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(0, n, (3, 10), generator=g) for n in q.codebook_sizes], -1)
    idx[0, 0] = 0
    idx[0, 1] = torch.tensor([n - 1 for n in q.codebook_sizes])
    t = layout.to_targets(idx)
    assert t.shape == (3, 10, len(layout.sizes))
    assert ((t >= 0) & (t < torch.tensor(layout.sizes))).all()
    assert torch.equal(layout.from_targets(t), idx)


def test_binary_heads_are_groups_of_channels():
    """LFQ (little-endian) head h holds channels 8h..8h+7; BSQ (big-endian) the last channels first."""
    lfq = _quantizer("lfq", code_dim=18)
    bits = torch.zeros(18, dtype=torch.long)
    bits[[0, 9, 17]] = 1  # channels 0 (head 0, bit 0), 9 (head 1, bit 1), 17 (head 2, bit 1)
    idx = (bits * 2 ** torch.arange(18)).sum().view(1, 1, 1)
    assert (lfq.indices_to_codes(idx)[0, 0] > 0).long().tolist() == bits.tolist()
    assert HeadLayout.for_quantizer(lfq).to_targets(idx).view(-1).tolist() == [1, 2, 2]
    bsq = _quantizer("bsq", code_dim=18, entropy_group_size=9)
    idx = (bits * 2 ** (17 - torch.arange(18))).sum().view(1, 1, 1)  # big-endian: channel i has weight 2^(17-i)
    assert (bsq.indices_to_codes(idx)[0, 0] > 0).long().tolist() == bits.tolist()
    # digit j is channel 17 - j: channel 17 -> head 0 bit 0, channel 9 -> head 1 bit 0, channel 0 -> head 2 bit 1
    assert HeadLayout.for_quantizer(bsq).to_targets(idx).view(-1).tolist() == [1, 1, 2]


def test_group_radices_hand_cases():
    assert group_radices([2] * 20, 8) == [256, 256, 16]
    assert group_radices([2] * 20, 5) == [32] * 4
    assert group_radices([8, 5, 5, 5], 8) == [8, 5, 5, 5]
    assert group_radices([2, 2, 3, 2], 8) == [4, 3, 2]
    assert group_radices([4096], 8) == [4096]


# ---- the prior and its samplers -------------------------------------------------------------------


def _prior(sequential=False, sizes=(7, 5), n_tokens=6, n_classes=3, seed=0, sharp=3.0):
    torch.manual_seed(seed)
    p = Prior(list(sizes), n_tokens, n_classes, width=32, depth=2, heads=4, sequential=sequential)
    with torch.no_grad():  # larger weights than the init: peaked, input-dependent distributions
        for m in p.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.mul_(sharp / 0.02 * 0.05)
    return p.eval()


@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
@pytest.mark.parametrize("scale,top_k", [(1.0, 0), (2.5, 0), (3.0, 3)])
def test_cached_and_uncached_samplers_give_the_same_tokens(sequential, scale, top_k):
    p = _prior(sequential)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    a = sample(p, labels, scale, 1.0, top_k, torch.Generator().manual_seed(5), kv_cache=True)
    b = sample(p, labels, scale, 1.0, top_k, torch.Generator().manual_seed(5), kv_cache=False)
    assert torch.equal(a, b)
    assert len(set(map(tuple, a.flatten(1).tolist()))) > 1  # not a degenerate constant sample


def test_cached_hidden_states_equal_the_full_forward():
    p = _prior(True)
    labels = torch.tensor([0, 2])
    t = torch.randint(0, 5, (2, 6, 2))
    full = p.hidden(labels, t[:, :-1])
    cache = p.new_cache(2, torch.device("cpu"))
    x = p.cls(labels)
    for i in range(6):
        h = p.step(x, i, cache)
        assert torch.allclose(h, full[:, i], atol=1e-5)
        x = p.embed(t[:, i:i + 1])[:, 0]


def test_sampling_with_a_fixed_seed_is_deterministic():
    p = _prior()
    labels = torch.arange(3).repeat(4)
    a = sample(p, labels, 2.0, 1.0, 0, torch.Generator().manual_seed(1))
    b = sample(p, labels, 2.0, 1.0, 0, torch.Generator().manual_seed(1))
    c = sample(p, labels, 2.0, 1.0, 0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _reference_conditional_sampler(p, labels, generator):
    """Brute force: at every position the teacher-forced conditional logits of the prefix so far."""
    b, n, nh = len(labels), p.n_tokens, len(p.sizes)
    out = torch.zeros(b, n, nh, dtype=torch.long)
    for i in range(n):
        for k in range(nh):
            logits = p(labels, out)[k][:, i]  # position i, head k: reads only out[:, :i] and out[:, i, :k]
            out[:, i, k] = draw(logits, 1.0, 0, generator)
    return out


@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
def test_guidance_scale_one_is_the_conditional_model(sequential):
    p = _prior(sequential)
    labels = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        ref = _reference_conditional_sampler(p, labels, torch.Generator().manual_seed(3))
    got = sample(p, labels, 1.0, 1.0, 0, torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)
    c, u = torch.randn(4, 7), torch.randn(4, 7)
    assert torch.allclose(guided(c, u, 1.0), c, atol=1e-6)
    assert torch.allclose(guided(c, u, 3.0), 3 * c - 2 * u, atol=1e-5)


def test_draw_inverts_the_cdf():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([draw(logits.expand(4000, 3), 1.0, 0, g)]), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.25, 0.25]), atol=0.03)
    assert (draw(logits.expand(200, 3), 1.0, 1, g) == 0).all()  # top-1: the mode


def test_bits_per_image_of_a_uniform_prior_is_the_token_capacity():
    """Zero output weights: every head is uniform, so NLL = N * sum_h log2(size_h) bits exactly."""
    layout = HeadLayout([[7, 5], [3]])
    p = Prior(layout.sizes, 6, 3, width=32, depth=1, heads=4)
    with torch.no_grad():
        p.out.weight.zero_()
        p.out.bias.zero_()
    gen = Generation(GenerationConfig())
    idx = torch.stack([torch.randint(0, 35, (10, 6)), torch.randint(0, 3, (10, 6))], -1)
    bits = gen.bits_per_image(Bundle(p, layout, []), idx, torch.randint(0, 3, (10,)), torch.device("cpu"))
    assert bits == pytest.approx(6 * math.log2(7 * 5 * 3), rel=1e-5)


def test_training_lowers_the_nll_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 4, (3, 6, 1), generator=g)  # one sequence per class
    labels = torch.arange(3).repeat(20)
    targets = base[labels]
    cfg = GenerationConfig(width=32, depth=1, heads=4, steps=60, batch_size=16, lr=3e-3, warmup=5)
    state = torch.get_rng_state()
    prior = train_prior(targets, labels, [4], 3, cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        nll = prior.nll(torch.arange(3), base) / math.log(2)
    assert (nll < 0.2 * 6 * 2).all()  # far below the uniform 12 bits per image


# ---- known answer: one fixed image per class -----------------------------------------------------


class OneImageConfig(DatasetConfig):
    type: str = "one_image"
    image_size: int = 16
    n: int = 48
    n_classes: int = 4


class OneImagePerClass(Dataset):
    """Class c is always the same smooth random image; the label cycles through the classes."""

    Config = OneImageConfig

    def __init__(self, cfg, split="eval", seed=0):
        self.cfg, self.split, self.seed = cfg, split, seed
        self.class_names = [f"c{i}" for i in range(cfg.n_classes)]
        g = torch.Generator().manual_seed(123)
        small = torch.rand(cfg.n_classes, 3, 4, 4, generator=g) * 1.8 - 0.9
        self.images = torch.nn.functional.interpolate(small, size=(cfg.image_size,) * 2, mode="bilinear")

    def __len__(self):
        return self.cfg.n

    def __getitem__(self, i):
        c = i % self.cfg.n_classes
        return {"image": self.images[c], "label": c}


def _tiny_tokenizer():
    from core.config import validate
    from core.model import Tokenizer
    from conftest import tiny_experiment

    exp = validate(tiny_experiment())
    torch.manual_seed(0)
    return Tokenizer(exp.model, 16).eval()


def test_prior_reproduces_one_image_per_class(tmp_path):
    """The tokens of class c are one fixed sequence: a trained prior samples exactly it, so its
    samples decode to the reconstructions and their gFD equals the reconstructions' FD."""
    model = _tiny_tokenizer()
    ds = OneImagePerClass(OneImageConfig(n=32))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    cfg = GenerationConfig(width=32, depth=1, heads=4, steps=150, batch_size=16, lr=1e-2, warmup=5, n_samples=32,
                           grid_per_class=2, extractor="reference", cache_dir=str(tmp_path), reference={"width": 8, "steps": 20, "batch_size": 16})
    gen = Generation(cfg)
    with torch.no_grad():
        out = gen.evaluate(model, loader)
        space, net, uint8 = extractor(cfg, ds)
        feats = feature_fn(net, uint8, torch.device("cpu"))
        x = torch.stack([ds[i]["image"] for i in range(32)])
        recon = model.decode(model.encode(x)).clamp(-1, 1)
        fd_recon = frechet_distance(feats(x), feats(recon))
        idx_per_class = model.encode(ds.images)
        _, idx = gen.sample_images(gen.last["bundle"], model, torch.arange(4).repeat(8), 1.0, seed=9)
    assert set(out) == {"gfd_refnet", "gfd_refnet_nocfg", "prior_bits_per_image", "prior_bits_per_token"}
    exact = (idx == idx_per_class[torch.arange(4).repeat(8)]).all(-1).all(-1).float().mean()
    assert exact >= 0.95
    # guidance sharpens the prior (exact here); without it a sample in 32 may still slip
    assert out["gfd_refnet"] == pytest.approx(fd_recon, rel=0.02)
    assert out["gfd_refnet_nocfg"] == pytest.approx(fd_recon, rel=0.1)
    assert out["prior_bits_per_image"] < 0.5
    assert out["prior_bits_per_token"] == pytest.approx(out["prior_bits_per_image"] / 16)
    assert gen.last["grid"].shape == (4 * 2, 3, 16, 16)


# ---- through the trainer and core.generate -------------------------------------------------------


def _gen_eval(**kw):
    return {"type": "generation", "width": 32, "depth": 1, "heads": 4, "steps": 10, "batch_size": 8, "n_samples": 8,
            "grid_per_class": 2, "train_images": 32, "extractor": "reference", "reference": {"width": 8, "steps": 2}, **kw}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny tracked run whose eval list holds a generation evaluator (module-wide: trained once)."""
    import os

    from core.config import validate
    from core.trainer import train
    from conftest import tiny_experiment

    d = tmp_path_factory.mktemp("gen_run")
    old = os.getcwd()
    saved = {k: os.environ.get(k) for k in ("VTOK_CACHE", "MLFLOW_TRACKING_URI")}
    os.chdir(d)
    os.environ["VTOK_CACHE"] = str(d / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        exp = validate(tiny_experiment(eval=[{"type": "psnr_ssim"}, _gen_eval()], **{"tracking.enabled": True}))
        yield d, train(exp)
    finally:
        os.chdir(old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_trainer_saves_the_prior_and_grid_and_core_generate_reuses_it(trained_run, tmp_path, monkeypatch):
    from core import generate

    d, result = trained_run
    assert {"gfd_refnet", "gfd_refnet_nocfg", "prior_bits_per_image"} <= set(result.metrics)
    prior_file = result.run_dir / "generation" / "prior.safetensors"
    assert prior_file.is_file() and (result.run_dir / "generation" / "samples_00000006.png").is_file()
    from mlflow.tracking import MlflowClient

    from core.tracking import resolve_uri

    arts = [a.path for a in MlflowClient(resolve_uri(f"sqlite:///{d / 'mlflow.db'}")).list_artifacts(result.run_id, "generation")]
    assert arts == ["generation/samples_00000006.png"]

    def no_fit(*a, **k):
        raise AssertionError("the saved prior should have been reused")

    monkeypatch.setattr(Generation, "fit", no_fit)
    out = tmp_path / "grid.png"
    assert generate.main(["--run", str(result.run_dir), "--class", "circle", "--n", "4", "--cfg", "2.0", "--out", str(out)]) == 0
    assert out.is_file()
    st = tmp_path / "s.safetensors"
    assert generate.main(["--run", str(result.run_dir), "--class", "0", "--n", "3", "--out", str(st), "--seed", "4"]) == 0
    from safetensors.torch import load_file

    imgs = load_file(str(st))["images"]
    assert imgs.shape == (3, 3, 16, 16) and imgs.abs().max() <= 1
    st2 = tmp_path / "s2.safetensors"
    assert generate.main(["--run", str(result.run_dir), "--class", "0", "--n", "3", "--out", str(st2), "--seed", "4"]) == 0
    assert torch.equal(load_file(str(st2))["images"], imgs)  # same seed, same samples


@pytest.mark.slow
def test_core_generate_trains_and_saves_a_missing_prior_once(in_tmp, monkeypatch):
    from core import generate
    from core.config import validate
    from core.trainer import train
    from conftest import tiny_experiment

    result = train(validate(tiny_experiment()))  # no generation evaluator: core.generate uses its defaults
    calls = []
    real_fit = Generation.fit

    def counting_fit(self, model, train_set):
        calls.append(1)
        return real_fit(self, model, train_set)

    monkeypatch.setattr(Generation, "fit", counting_fit)
    small = GenerationConfig(**{k: v for k, v in _gen_eval().items() if k != "type"})
    monkeypatch.setattr(generate, "generation_plugin", lambda exp: (Generation(small), small))
    args = ["--run", str(result.run_dir), "--class", "square", "--n", "2", "--out", str(in_tmp / "a.png")]
    assert generate.main(args) == 0 and generate.main(args) == 0
    assert len(calls) == 1 and (result.run_dir / "generation" / "prior.safetensors").is_file()


@pytest.mark.parametrize("extra,where", [
    (["--class", "unicorn"], "--class"),
    (["--class", "circle", "--cfg", "0.5"], "--cfg"),
    (["--class", "circle", "--n", "0"], "--n"),
    (["--class", "circle", "--prior", "missing.safetensors"], "--prior"),
])
def test_core_generate_bad_input_is_one_error_line(trained_run, tmp_path, capsys, extra, where):
    from core import generate

    _, result = trained_run
    capsys.readouterr()
    assert generate.main(["--run", str(result.run_dir), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {where}"), err
    assert not (tmp_path / "x.png").exists()


def test_a_prior_for_another_tokenizer_is_refused(tmp_path):
    from core.errors import ConfigError
    from plugins.evaluators.generation import load_prior, save_prior

    model = _tiny_tokenizer()  # 4x4 tokens, one 32-way head
    ok = tmp_path / "ok.safetensors"
    save_prior(Bundle(Prior([32], 16, 2, width=16, depth=1, heads=2), HeadLayout([[32]]), ["a", "b"]), ok)
    bundle, _ = load_prior(ok, model)
    assert bundle.class_names == ["a", "b"] and bundle.prior.sizes == [32]
    for name, prior, layout in [("grid", Prior([32], 9, 2, width=16, depth=1, heads=2), HeadLayout([[32]])),
                                ("heads", Prior([16, 2], 16, 2, width=16, depth=1, heads=2), HeadLayout([[16, 2]]))]:
        bad = tmp_path / f"{name}.safetensors"
        save_prior(Bundle(prior, layout, ["a", "b"]), bad)
        with pytest.raises(ConfigError, match="the tokenizer has 16 tokens with heads"):
            load_prior(bad, model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a vtok prior file"):
        load_prior(junk, model)


def test_config_refuses_guidance_without_label_dropout_and_bad_heads():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs label_dropout > 0"):
        GenerationConfig(cfg_scale=2.0, label_dropout=0.0)
    GenerationConfig(cfg_scale=1.0, label_dropout=0.0)
    with pytest.raises(ValidationError, match="3 heads do not divide the width 64"):
        GenerationConfig(width=64, heads=3)
