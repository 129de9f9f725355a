"""The semantic side (CLIP image head, text tower, clamped logit scale), encode/decode against the
model's reconstruction, and ``python -m core.tokenize`` round trips."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core import tokenize
from core.config import validate
from core.errors import ConfigError
from core.model import Tokenizer
from conftest import tiny_experiment

TEXT = {"width": 32, "depth": 1, "heads": 2, "context_length": 16, "embed_dim": 24}


def tiny_model(encoder=None, decoder=None, projectors=False, text=False, seed=0) -> Tokenizer:
    exp = tiny_experiment()
    m = exp["model"]
    if encoder:
        m["encoder"] = encoder
    if decoder:
        m["decoder"] = decoder
    if projectors:
        m["pre_projector"] = {"type": "attention"}
        m["post_projector"] = {"type": "attention", "out_dim": 16}
        m["encoder"]["out_dim"] = 16
    if text:
        m["text"] = TEXT
    torch.manual_seed(seed)
    spec = validate(exp)
    return Tokenizer(spec.model, spec.data.image_size)


def images(n=4, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


BACKBONES = [
    ({"type": "conv", "width": 8, "downsample": 4}, {"type": "conv", "width": 8}),
    ({"type": "vit", "width": 16, "depth": 1, "heads": 2, "downsample": 4}, {"type": "vit", "width": 16, "depth": 1, "heads": 2}),
    ({"type": "hybrid", "width": 16, "depth": 1, "heads": 2, "downsample": 4, "conv_width": 4},
     {"type": "hybrid", "width": 16, "depth": 1, "heads": 2, "conv_width": 4}),
]


@pytest.mark.parametrize("enc,dec", BACKBONES, ids=["conv", "vit", "hybrid"])
def test_encode_decode_equals_reconstruction(enc, dec):
    model = tiny_model(enc, dec, projectors=True).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
    idx = model.encode(x)
    assert idx.dtype == torch.int64 and idx.shape == (4, 16, 1)
    assert torch.equal(idx, out["quant"].indices)
    torch.testing.assert_close(model.decode(idx), out["recon"], rtol=1e-5, atol=1e-5)


def test_clip_head_and_text_tower_unit_norm():
    model = tiny_model(text=True).eval()
    x = images()
    with torch.no_grad():
        out = model(x)
    emb = out["image_embed"]
    assert emb.shape == (4, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # mean over tokens -> LayerNorm -> Linear -> l2-normalise, by hand
    head = model.clip_head
    pooled = out["post"].mean(dim=1)
    ref = F.normalize(F.layer_norm(pooled, (pooled.shape[-1],), head.norm.weight, head.norm.bias, head.norm.eps) @ head.proj.weight.T + head.proj.bias, dim=-1)
    torch.testing.assert_close(emb, ref)
    # the discrete path gives the same embedding (zero-shot evaluation reads it)
    torch.testing.assert_close(model.image_embed_from_indices(model.encode(x)), emb, rtol=1e-5, atol=1e-5)
    t = model.encode_text(["a red circle", "two blue squares", ""])
    assert t.shape == (3, 24)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(t[0], t[1])


def test_text_tower_is_open_clip_from_scratch():
    from open_clip.transformer import TextTransformer

    model = tiny_model(text=True)
    assert isinstance(model.text.transformer, TextTransformer)
    tokens = model.text.tokenize(["a photo of a cat."], torch.device("cpu"))
    assert tokens.shape == (1, 16) and tokens[0, 0] == 49406  # open_clip's <start_of_text>


def test_logit_scale_clamped():
    model = tiny_model(text=True)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.clamped_logit_scale().detach()) == pytest.approx(math.log(100))
    assert float(model.clamped_logit_scale().detach().exp()) == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    assert float(model.clamped_logit_scale().detach()) == 0.0
    # the value is clamped but the gradient passes straight through, inside the range and outside it
    # (the official forward reads the parameter unclamped; the trainer clamps it after each step)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.clamped_logit_scale().backward()
    assert float(model.logit_scale.grad) == 1.0
    model.logit_scale.grad = None
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    model.clamped_logit_scale().backward()
    assert float(model.logit_scale.grad) == 1.0


def test_text_heads_must_divide_width():
    with pytest.raises(ConfigError, match="model.text"):
        exp = tiny_experiment()
        exp["model"]["text"] = {"width": 30, "depth": 1, "heads": 4}
        spec = validate(exp)
        Tokenizer(spec.model, spec.data.image_size)


# ---- python -m core.tokenize ---------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path, monkeypatch):
    """A tiny model whose weights go through a safetensors file, served by load_for_inference."""
    model = tiny_model(*BACKBONES[1], projectors=True)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    exp = validate(tiny_experiment())
    loaded = tiny_model(*BACKBONES[1], projectors=True, seed=123)  # other init: the weights come from the file
    assert not torch.equal(loaded.decoder.last_layer, model.decoder.last_layer)
    loaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    import core.rundir

    monkeypatch.setattr(core.rundir, "load_for_inference", lambda run, device="cpu": (exp, loaded.eval()))
    return exp, loaded


def test_tokenize_round_trip(saved_model, tmp_path):
    exp, model = saved_model
    out = tmp_path / "tokens.safetensors"
    assert tokenize.main(["--run", "somerun", "--out", str(out), "--limit", "10", "--batch-size", "4"]) == 0
    with safe_open(str(out), "pt") as f:
        idx, meta, labels = f.get_tensor("indices"), f.metadata(), f.get_tensor("labels")
    assert idx.dtype == torch.int64 and idx.shape == (10, 16, 1) and labels.shape == (10,)
    assert meta["grid"] == "4,4" and meta["codes_per_token"] == "1" and meta["codebook_sizes"] == "[32]"
    from core.plugins import get_registry

    ds = get_registry().get("datasets", "shapes")(exp.data, split="eval", seed=exp.seed)
    x = torch.stack([ds[i]["image"] for i in range(10)])
    assert torch.equal(idx, model.encode(x))
    assert torch.equal(labels, torch.tensor([ds[i]["label"] for i in range(10)]))
    imgs_file = tmp_path / "images.safetensors"
    assert tokenize.main(["--run", "somerun", "--decode", str(out), "--out", str(imgs_file)]) == 0
    decoded = load_file(str(imgs_file))["images"]
    with torch.no_grad():
        recon = model(x)["recon"].clamp(-1, 1)
    torch.testing.assert_close(decoded, recon, rtol=1e-5, atol=1e-5)
    png_dir = tmp_path / "pngs"
    assert tokenize.main(["--run", "somerun", "--decode", str(out), "--out", str(png_dir)]) == 0
    assert len(list(png_dir.glob("*.png"))) == 10


def test_tokenize_data_overrides_and_errors(saved_model, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert tokenize.main(["--run", "r", "--out", str(out), "--split", "train", "type=shapes", "train_size=6", "image_size=16"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("indices").shape == (6, 16, 1)
    data_file = tmp_path / "data.yaml"
    data_file.write_text("data: {type: shapes, image_size: 16, train_size: 3}\n")
    assert tokenize.main(["--run", "r", "--out", str(out), "--data", str(data_file), "--split", "train"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("indices").shape == (3, 16, 1)
    capsys.readouterr()
    assert tokenize.main(["--run", "r", "--out", str(out), "image_size=32"]) == 2
    assert "data.image_size" in capsys.readouterr().err
    assert tokenize.main(["--run", "r", "--out", str(out), "trian_size=3"]) == 2
    assert "data.trian_size: unknown key" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"indices": torch.full((2, 16, 1), 99, dtype=torch.int64)}, str(bad), metadata={"grid": "4,4"})
    assert tokenize.main(["--run", "r", "--decode", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "outside the codebooks" in capsys.readouterr().err
    save_file({"indices": torch.zeros((2, 9, 1), dtype=torch.int64)}, str(bad), metadata={"grid": "3,3"})
    assert tokenize.main(["--run", "r", "--decode", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "grid 3,3" in capsys.readouterr().err


def test_tokenize_from_a_trained_run(in_tmp):
    """End to end through the trainer's checkpoint and load_for_inference (2 training steps)."""
    from core.run import main as run_main

    import yaml

    exp = tiny_experiment(**{"train.steps": 2, "train.progress": False})
    (in_tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
    assert run_main([str(in_tmp / "exp.yaml")]) == 0
    run_dir = next((in_tmp / "runs").iterdir())
    assert tokenize.main(["--run", str(run_dir), "--out", "tok.safetensors", "--limit", "4"]) == 0
    assert tokenize.main(["--run", str(run_dir), "--decode", "tok.safetensors", "--out", "img.safetensors"]) == 0
    from core.rundir import load_for_inference

    _, model = load_for_inference(str(run_dir))
    idx = load_file("tok.safetensors")["indices"]
    torch.testing.assert_close(load_file("img.safetensors")["images"], model.decode(idx).clamp(-1, 1))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(10):
            yield {"image": torch.full((3, 2, 2), float(i)), "text": f"item {i}"}


def test_image_batches_limit_on_streams_and_missing_labels():
    batches = list(tokenize.image_batches(_Stream(), batch_size=4, limit=6))
    assert [len(b[0]) for b in batches] == [4, 2] and all(b[1] is None for b in batches)
    assert torch.equal(torch.cat([b[0] for b in batches])[:, 0, 0, 0], torch.arange(6.0))
    assert sum(len(b[0]) for b in tokenize.image_batches(_Stream(), batch_size=4, limit=None)) == 10


def test_discrete_path_equals_indices_path_and_continuous_baseline_has_one():
    from core.config import validate
    from core.model import Tokenizer
    from conftest import tiny_experiment

    exp = validate(tiny_experiment(**{"model.text": {"width": 32, "heads": 2, "depth": 1}}))
    model = Tokenizer(exp.model, 16).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model.image_embed_discrete(x), model.image_embed_from_indices(model.encode(x)))
    cont = validate(tiny_experiment(**{"model.text": {"width": 32, "heads": 2, "depth": 1},
                                       "model.quantizer": {"type": "identity", "code_dim": 8}}))
    model = Tokenizer(cont.model, 16).eval()
    assert torch.equal(model.discrete_latent(x), model(x)["zq"])
