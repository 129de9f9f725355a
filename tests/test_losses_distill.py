"""Pre-Post Distillation: cosine terms by hand, teachers from local files, validation messages,
and the UniWeTok Table 2 setting (post-only, with and without SigLu) for a few steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from core.config import validate
from core.errors import ConfigError
from core.model import Tokenizer
from losses_helpers import images, tiny_exp, tiny_model, total_loss
from plugins.losses.distill import DistillLoss, Teacher
from plugins.losses.pixel import PixelLoss
from plugins.losses.quantizer import QuantizerLoss


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "teacher.pth"
    torch.save(timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict(), path)
    return path


def timm_teacher(path, **kw):
    return {"teacher": {"kind": "timm", "name": "test_vit", "weights": str(path)}, **kw}


class MeanColour(torch.nn.Module):
    """A transparent teacher: the per-channel mean colour of the image, repeated to width 6."""

    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 2)


def test_linear_heads_cosine_terms_by_hand(tmp_path):
    model = tiny_model()
    t = Teacher(lambda n, x: n(x), MeanColour(), None)
    cfg = DistillLoss.Config(teacher={"kind": "timm", "name": "x", "weights": str(_touch(tmp_path))}, head="linear", eta=0.5)
    loss = DistillLoss(cfg, model=model, teacher=t)
    x = images(3)
    out = model(x)
    terms = loss({}, out, 0).terms
    f = x.mean(dim=(2, 3)).repeat(1, 2)
    for name, head, key in (("pre", loss.head_pre, "z"), ("post", loss.head_post, "zq")):
        pred = out[key].mean(dim=1) @ head.proj.weight.t() + head.proj.bias
        ref = (1 - (pred * f).sum(-1) / (pred.norm(dim=-1) * f.norm(dim=-1))).mean()
        assert terms[name].item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.term_weights() == {"pre": 1.0, "post": 0.5}


def _touch(tmp_path):
    p = tmp_path / "w.pth"
    p.write_bytes(b"")
    return p


def test_pre_post_switches_and_attention_head(vit_file):
    model = tiny_model()
    only_post = DistillLoss(DistillLoss.Config(**timm_teacher(vit_file, pre=False)), model=model)
    assert only_post.head_pre is None and set(only_post({}, model(images(2)), 0).terms) == {"post"}
    with pytest.raises(ConfigError, match="at least one of pre / post"):
        tiny_exp(losses=[{"type": "distill", **timm_teacher(vit_file, pre=False, post=False)}])


def test_timm_teacher_reads_local_file(vit_file):
    model = tiny_model()
    loss = DistillLoss(DistillLoss.Config(**timm_teacher(vit_file)), model=model)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0)
    net.load_state_dict(torch.load(vit_file, weights_only=True))
    x = images(2)
    x160 = F.interpolate(x, size=(160, 160), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    ref = net.eval()(((x160 + 1) / 2 - mean) / std)
    assert torch.allclose(loss.teacher_embed(x), ref, atol=1e-5)
    assert list(loss.parameters()) and not any(p is q for p in loss.parameters() for q in net.parameters())


def test_missing_teacher_fails_at_validation(tmp_path):
    missing = tmp_path / "siglip.pth"
    with pytest.raises(ConfigError) as e:
        tiny_exp(losses=[{"type": "distill", **timm_teacher(missing)}])
    assert str(missing) in str(e.value) and str(e.value).startswith("losses.0.teacher") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="teacher run not found"):
        tiny_exp(losses=[{"type": "distill", "teacher": {"kind": "vtok", "weights": str(tmp_path / "runs" / "clip")}}])
    with pytest.raises(ConfigError, match="needs a model name"):
        tiny_exp(losses=[{"type": "distill", "teacher": {"kind": "open_clip", "weights": str(missing)}}])


def test_vtok_teacher_uses_the_continuous_clip_path(tmp_path, monkeypatch):
    exp = validate({
        "data": {"type": "shapes", "image_size": 16},
        "model": {"encoder": {"type": "conv", "width": 8, "downsample": 4}, "quantizer": {"type": "identity", "code_dim": 8},
                  "decoder": {"type": "conv", "width": 8}, "text": {"width": 32, "depth": 1, "heads": 2, "context_length": 16}},
    })
    torch.manual_seed(1)
    teacher = Tokenizer(exp.model, 16).eval()
    import plugins.losses.distill as distill

    monkeypatch.setattr(distill, "load_for_inference", lambda path: (exp, teacher))
    loss = DistillLoss(DistillLoss.Config(teacher={"kind": "vtok", "weights": str(tmp_path)}), model=tiny_model())
    x = images(2)
    with torch.no_grad():
        ref = teacher(x)["image_embed"]  # identity quantizer: the forward's embedding is the continuous one
    assert torch.allclose(loss.teacher_embed(x), ref, atol=1e-6)


@pytest.mark.parametrize("activation", ["none", "siglu"])
def test_table2_post_only_with_and_without_siglu_runs(vit_file, activation):
    exp = tiny_exp(quantizer={"type": "gq", "codes_per_token": 2, "code_dim": 4})
    spec = exp.model.model_copy(update={"encoder": exp.model.encoder.model_copy(update={"final_activation": activation})})
    torch.manual_seed(0)
    model = Tokenizer(spec, 16)
    losses = [PixelLoss(PixelLoss.Config()), QuantizerLoss(QuantizerLoss.Config(), model=model),
              DistillLoss(DistillLoss.Config(**timm_teacher(vit_file, pre=False)), model=model)]
    params = list(model.parameters()) + [p for l in losses for p in l.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9))
    for step in range(3):
        out = model(images(4, seed=step))
        loss = sum(total_loss(l, {}, out, step) for l in losses)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        assert all(p.grad is not None for p in losses[2].head_post.parameters())  # the head trains too
        opt.step()
    if activation == "siglu":
        assert out["latent"].abs().max() <= 1.0


def test_clip_teacher_experiment_validates_and_is_continuous():
    from core.config import load_experiment

    exp = load_experiment(Path(__file__).resolve().parent.parent / "experiments" / "clip_teacher.yaml")
    assert exp.model.quantizer.type == "identity" and [l.type for l in exp.losses] == ["contrastive"]
    model = Tokenizer(exp.model, exp.data.image_size).eval()
    x = images(2, exp.data.image_size)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out["zq"], out["z"]) and out["quant"].indices.shape[-1] == 0
        from plugins.losses.distill import _vtok_embed

        assert torch.allclose(_vtok_embed(model, x), out["image_embed"], atol=1e-6)


def test_open_clip_teacher_reads_local_file(tmp_path):
    import json

    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "vtok-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)  # a tiny architecture in open_clip's own config format
    torch.manual_seed(0)
    net = open_clip.create_model("vtok-test-tiny").eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loss = DistillLoss(DistillLoss.Config(teacher={"kind": "open_clip", "name": "vtok-test-tiny", "weights": str(tmp_path / "w.pt")}),
                       model=tiny_model())
    x = images(2)
    x32 = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.encode_image(((x32 + 1) / 2 - mean) / std)
    assert loss.head_pre is not None and torch.allclose(loss.teacher_embed(x), ref, atol=1e-5)



def test_ambiguous_teacher_prefix_is_a_config_error_at_the_teacher(tmp_path):
    from core.checkpoint import save_checkpoint

    for name in ("clip_teacher-aaaa00000000", "clip_teacher_big-bbbb00000000"):
        save_checkpoint(tmp_path / "runs" / name, 1, {"w": torch.zeros(1)}, {}, {})
    with pytest.raises(ConfigError, match=r"^losses\.0\.teacher.*ambiguous run-name prefix: it matches 2 runs"):
        tiny_exp(losses=[{"type": "distill", "teacher": {"kind": "vtok", "weights": str(tmp_path / "runs" / "clip")}}])
