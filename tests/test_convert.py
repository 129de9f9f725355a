"""``python -m core.convert``: UniTok's official state dict -> a vtok run directory.

The official key names and shapes are enumerated here from FoundationVision/UniTok's model code
(``models/unitok.py`` UniTok, ``models/vitamin.py`` ViTamin encoder / ViTaminDecoder / GeGluMlp,
``models/vqvae.py`` AttnProjection, ``models/quant.py`` VectorQuantizerM, open_clip's text tower),
at a small width. Every official tensor gets distinct values; each must land in exactly one vtok
tensor, and a module rebuilt in the official layout must give vtok's output once its weights are
converted (so a swapped pair of same-shaped tensors fails too).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import yaml
from timm.layers import make_divisible

from core.config import validate
from core.convert import convert_state, main
from core.model import Tokenizer

C, L, HEADS = 32, 2, 2  # transformer width, depth, heads (encoder and decoder)
STEM, STAGES, CONV_DEPTH = 8, (8, 16), 2  # ViTamin conv part: stem width, MbConv stage widths, blocks per stage
V, N_CB, K = 8, 2, 16  # vocab_width (latent), codebooks, entries per codebook
DEC_STAGES, DEC_DEPTHS = (16, 8), (2, 1)  # decoder MbConv stage widths and depths
TW, TL, CTX, E = 32, 1, 16, 24  # text width, layers, context, joint embedding width
TEXT_VOCAB = 49408

MODEL = {
    "encoder": {"type": "hybrid", "downsample": 16, "width": C, "depth": L, "heads": HEADS, "conv_width": STEM,
                "channel_mult": [s // STEM for s in STAGES], "conv_depth": CONV_DEPTH},
    "pre_projector": {"type": "attention"},
    "quantizer": {"type": "mcq", "codes_per_token": N_CB, "codebook_size": K, "code_dim": V // N_CB},
    "post_projector": {"type": "attention"},
    "decoder": {"type": "vitamin", "width": C, "depth": L, "heads": HEADS, "stage_widths": list(DEC_STAGES),
                "stage_depths": list(DEC_DEPTHS)},
    "text": {"width": TW, "depth": TL, "heads": 2, "context_length": CTX, "embed_dim": E},
}
EXPERIMENT = {"name": "unitok_small", "data": {"type": "shapes", "image_size": 32}, "model": MODEL}


# ---- the official names and shapes ------------------------------------------------------------


def _ln(prefix: str, n: int) -> dict:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _lin(prefix: str, i: int, o: int, bias: bool = True) -> dict:
    return {f"{prefix}.weight": (o, i), **({f"{prefix}.bias": (o,)} if bias else {})}


def _conv(prefix: str, i: int, o: int, k: int, groups: int = 1) -> dict:
    return {f"{prefix}.weight": (o, i // groups, k, k), f"{prefix}.bias": (o,)}


def _vit_block(p: str, c: int) -> dict:
    """timm Block with UniTok's GeGluMlp (hidden 2c, own LayerNorm)."""
    return {**_ln(f"{p}.norm1", c), **_lin(f"{p}.attn.qkv", c, 3 * c), **_lin(f"{p}.attn.proj", c, c), **_ln(f"{p}.norm2", c),
            **_ln(f"{p}.mlp.norm", c), **_lin(f"{p}.mlp.w0", c, 2 * c), **_lin(f"{p}.mlp.w1", c, 2 * c), **_lin(f"{p}.mlp.w2", 2 * c, c)}


def _mbconv(p: str, i: int, o: int, first: bool, inverse: bool) -> dict:
    mid = make_divisible(o * 4)
    out = {**_ln(f"{p}.pre_norm", i), **_conv(f"{p}.conv1_1x1", i, mid, 1), **_conv(f"{p}.conv2_kxk", mid, mid, 3, groups=mid),
           **_conv(f"{p}.conv3_1x1", mid, o, 1)}
    if inverse and first:  # InvMbConvLNBlock: Upsample2d shortcut and an Upsample2d after the 1x1 expansion
        out.update({**_conv(f"{p}.shortcut.conv", i, o, 3), **_conv(f"{p}.up.conv", mid, mid, 3)})
    elif first and i != o:  # MbConvLNBlock: Downsample2d (avg pool + 1x1 expand when widths differ)
        out.update(_conv(f"{p}.shortcut.expand", i, o, 1))
    return out


def _projection(p: str, i: int, o: int) -> dict:
    inner = max(i, o)
    return {**_ln(f"{p}.norm1", i), f"{p}.attn.q_bias": (inner,), f"{p}.attn.v_bias": (inner,), f"{p}.attn.zero_k_bias": (inner,),
            **_lin(f"{p}.attn.qkv", i, 3 * inner, bias=False), **_lin(f"{p}.attn.proj", o, o), **_lin(f"{p}.proj", i, o),
            **_ln(f"{p}.norm3", i), **_ln(f"{p}.norm2", o), **_ln(f"{p}.mlp.norm", o), **_lin(f"{p}.mlp.w0", o, 2 * o),
            **_lin(f"{p}.mlp.w1", o, 2 * o), **_lin(f"{p}.mlp.w2", 2 * o, o)}


def official_shapes() -> dict[str, tuple]:
    s: dict[str, tuple] = {"logit_scale": (), "encoder.pos_embed": (1, 1, C)}
    b = "encoder.patch_embed.backbone"
    s.update({**_conv(f"{b}.stem.conv1", 3, STEM, 3), **_ln(f"{b}.stem.norm1", STEM), **_conv(f"{b}.stem.conv2", STEM, STEM, 3)})
    ch = STEM
    for si, width in enumerate(STAGES):
        for d in range(CONV_DEPTH):
            s.update(_mbconv(f"{b}.stages.{si}.{d}", ch if d == 0 else width, width, d == 0, inverse=False))
        ch = width
    s.update({**_conv(f"{b}.pool.proj", ch, C, 3), **_ln(f"{b}.pool.norm", ch)})
    for i in range(L):
        s.update(_vit_block(f"encoder.blocks.{i}", C))
    s.update(_ln("encoder.norm", C))
    s.update(_projection("quant_proj", C, V))
    for i in range(N_CB):
        s.update({f"quantizer.codebooks.{i}.vocab_usage": (K,), f"quantizer.codebooks.{i}.codebook.weight": (K, V // N_CB)})
    s.update(_projection("post_quant_proj", V, C))
    for i in range(L):
        s.update(_vit_block(f"decoder.blocks.{i}", C))
    s.update({**_ln("decoder.norm", C), **_conv("decoder.up_conv1.conv", C, DEC_STAGES[0], 3)})
    ch = DEC_STAGES[0]
    for si, (width, depth) in enumerate(zip(DEC_STAGES, DEC_DEPTHS)):
        for d in range(depth):
            s.update(_mbconv(f"decoder.up_conv{2 + si}.{d}", ch if d == 0 else width, width, d == 0, inverse=True))
        ch = width
    s.update({**_conv("decoder.up_conv4.conv1.conv", ch, ch, 3), **_ln("decoder.up_conv4.norm1", ch), **_conv("decoder.up_conv4.conv2", ch, 3, 3)})
    t = "text_encoder"
    s.update({f"{t}.text_projection": (TW, E), f"{t}.positional_embedding": (CTX, TW), f"{t}.token_embedding.weight": (TEXT_VOCAB, TW)})
    for i in range(TL):
        r = f"{t}.transformer.resblocks.{i}"
        s.update({**_ln(f"{r}.ln_1", TW), f"{r}.attn.in_proj_weight": (3 * TW, TW), f"{r}.attn.in_proj_bias": (3 * TW,),
                  **_lin(f"{r}.attn.out_proj", TW, TW), **_ln(f"{r}.ln_2", TW), **_lin(f"{r}.mlp.c_fc", TW, 4 * TW),
                  **_lin(f"{r}.mlp.c_proj", 4 * TW, TW)})
    s.update({**_ln(f"{t}.ln_final", TW), **_ln("fc_norm", C), **_lin("projection", C, E)})
    return s


def official_state(distinct: bool = True) -> dict[str, torch.Tensor]:
    """Each tensor filled with values no other tensor has (constants -- zero buffers -- stay zero)."""
    g = torch.Generator().manual_seed(0)
    out, start = {}, 1.0
    for k, shape in official_shapes().items():
        n = torch.Size(shape).numel()
        if k.endswith(("zero_k_bias", "pos_embed")):
            out[k] = torch.zeros(shape)
        elif distinct:
            out[k] = torch.arange(start, start + n).reshape(shape) / 1024
        else:
            out[k] = torch.randn(shape, generator=g) * 0.2
        start += n
    return out


def small_model() -> Tokenizer:
    exp = validate(EXPERIMENT)
    torch.manual_seed(0)
    return Tokenizer(exp.model, exp.data.image_size)


# ---- tests --------------------------------------------------------------------------------------


def test_every_official_tensor_lands_once():
    official = official_state()
    model = small_model()
    sd = convert_state(official, model)
    values = torch.cat([t.flatten() for k, t in official.items()
                        if "vocab_usage" not in k and not k.endswith(("zero_k_bias", "pos_embed"))])
    params = dict(model.named_parameters())
    landed = torch.cat([sd[n].flatten() for n in params])
    assert torch.equal(values.sort().values, landed.sort().values)  # a bijection: nothing lost, nothing twice
    # and the specific places
    torch.testing.assert_close(sd["quantizer.codebook"][1], official["quantizer.codebooks.1.codebook.weight"])
    torch.testing.assert_close(sd["pre_projector.norm_linear.weight"], official["quant_proj.norm3.weight"])
    torch.testing.assert_close(sd["pre_projector.norm_attn.weight"], official["quant_proj.norm1.weight"])
    torch.testing.assert_close(sd["post_projector.norm_mlp.bias"], official["post_quant_proj.norm2.bias"])
    torch.testing.assert_close(sd["post_projector.linear.weight"], official["post_quant_proj.proj.weight"])
    torch.testing.assert_close(sd["encoder.trunk.stem.0.conv1.weight"], official["encoder.patch_embed.backbone.stem.conv1.weight"])
    torch.testing.assert_close(sd["encoder.trunk.stem.4.conv3_1x1.bias"], official["encoder.patch_embed.backbone.stages.1.1.conv3_1x1.bias"])
    torch.testing.assert_close(sd["encoder.trunk.stem.5.proj.weight"], official["encoder.patch_embed.backbone.pool.proj.weight"])
    torch.testing.assert_close(sd["decoder.stages.1.0.up.conv.weight"], official["decoder.up_conv3.0.up.conv.weight"])
    torch.testing.assert_close(sd["decoder.inv_stem.conv2.weight"], official["decoder.up_conv4.conv2.weight"])
    torch.testing.assert_close(sd["text.transformer.token_embedding.weight"], official["text_encoder.token_embedding.weight"])
    torch.testing.assert_close(sd["clip_head.norm.weight"], official["fc_norm.weight"])
    torch.testing.assert_close(sd["clip_head.proj.bias"], official["projection.bias"])
    torch.testing.assert_close(sd["logit_scale"], official["logit_scale"])


def test_encoder_official_layout_same_output():
    """timm's ViTamin nesting (UniTok's encoder) at small width vs vtok's own hybrid trunk, converted."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vitamin import GeGluMlp, HybridEmbed, MbConvStages, VitCfg, VitConvCfg

    backbone = MbConvStages(cfg=VitCfg(embed_dim=(*STAGES, C), depths=(CONV_DEPTH, CONV_DEPTH, 1), stem_width=STEM,
                                       conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6)))
    official = VisionTransformer(img_size=32, patch_size=1, embed_dim=C, depth=L, num_heads=HEADS, mlp_ratio=2.0,
                                 mlp_layer=GeGluMlp, act_layer="gelu_tanh", class_token=False, global_pool="", num_classes=0,
                                 pos_embed="none", embed_layer=partial(HybridEmbed, backbone=backbone, proj=False)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = small_model().eval()
    ckpt = official_state(distinct=False)
    ckpt.update({f"encoder.{k}": v for k, v in official.state_dict().items()})
    model.load_state_dict(convert_state(ckpt, model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x)[0], official.forward_features(x), rtol=1e-4, atol=1e-5)


def _write_checkpoint(tmp: Path, sd: dict, nested: bool = True) -> Path:
    path = tmp / "unitok.pth"
    torch.save({"trainer": {"unitok": sd}, "args": {"model": "small"}} if nested else sd, path)
    return path


def _write_config(tmp: Path) -> Path:
    path = tmp / "small.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    return path


def test_cli_writes_a_run_tokenize_and_teachers_accept(tmp_path, capsys):
    from core.rundir import load_for_inference
    from core.tokenize import main as tokenize_main

    official = official_state(distinct=False)
    out = tmp_path / "run"
    cfg = _write_config(tmp_path)
    assert main([str(_write_checkpoint(tmp_path, official)), "--config", str(cfg), "--out", str(out), "losses=[]", "seed=3"]) == 0
    exp, model = load_for_inference(str(out))
    assert exp.seed == 3  # the overrides reach the run's config
    torch.testing.assert_close(model.decoder.inv_stem.conv2.weight, official["decoder.up_conv4.conv2.weight"])
    torch.testing.assert_close(model.quantizer.codebook[0], official["quantizer.codebooks.0.codebook.weight"])
    from plugins.losses.distill import TeacherConfig, build_teacher

    teacher = build_teacher(TeacherConfig(weights=str(out)))  # a distillation teacher: the CLIP image embedding
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = model.clip_head(model.project_out(model.project_in(model.encoder(x)[0])))
        torch.testing.assert_close(teacher(x), want)
    tokens = tmp_path / "tokens.safetensors"
    assert tokenize_main(["--run", str(out), "--out", str(tokens), "--limit", "4", "--batch-size", "4"]) == 0
    from safetensors.torch import load_file

    idx = load_file(str(tokens))["indices"]
    assert idx.shape == (4, 4, N_CB)
    # the indices are the official quantizer's: argmax of cosine similarity to the official codebooks
    images = torch.stack(_first_images(exp, 4))
    with torch.no_grad():
        z = model.project_in(model.encoder(images)[0])
        for i in range(N_CB):
            zi = torch.nn.functional.normalize(z[..., i * (V // N_CB):(i + 1) * (V // N_CB)], dim=-1)
            cb = torch.nn.functional.normalize(official[f"quantizer.codebooks.{i}.codebook.weight"], dim=-1)
            assert torch.equal((zi @ cb.T).argmax(-1), idx[..., i])


def _first_images(exp, n):
    from core.plugins import get_registry

    ds = get_registry().get("datasets", exp.data.type)(exp.data, split="eval", seed=exp.seed)
    return [ds[i]["image"] for i in range(n)]


def _run_bad(tmp_path, sd, capsys) -> str:
    out = tmp_path / "run"
    code = main([str(_write_checkpoint(tmp_path, sd)), "--config", str(_write_config(tmp_path)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists() and not any(p.name.startswith(".run") for p in tmp_path.iterdir())
    return err


def test_unexpected_key_refused(tmp_path, capsys):
    sd = official_state(distinct=False)
    sd["decoder.up_conv5.conv.weight"] = torch.zeros(3, 3)
    assert "decoder.up_conv5.conv.weight" in _run_bad(tmp_path, sd, capsys)


def test_wrong_shape_refused(tmp_path, capsys):
    sd = official_state(distinct=False)
    sd["quant_proj.mlp.w0.weight"] = torch.zeros(2 * V + 1, V)
    err = _run_bad(tmp_path, sd, capsys)
    assert "quant_proj.mlp.w0.weight" in err and "shape" in err


def test_missing_key_refused(tmp_path, capsys):
    sd = official_state(distinct=False)
    del sd["post_quant_proj.norm2.weight"]  # a checkpoint of the older layout (no LayerNorm before the MLP)
    err = _run_bad(tmp_path, sd, capsys)
    assert "post_quant_proj.norm2.weight" in err and "missing" in err


def test_nonzero_constant_refused(tmp_path, capsys):
    sd = official_state(distinct=False)
    sd["encoder.pos_embed"] = torch.ones(1, 1, C)
    assert "encoder.pos_embed" in _run_bad(tmp_path, sd, capsys)


def test_not_a_checkpoint_refused(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code = main([str(bad), "--config", str(_write_config(tmp_path)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad.pth" in err
    assert not (tmp_path / "run").exists()


def test_full_scale_layout_accepted():
    """The official full model's keys and shapes (vitamin_large, 16 heads, 8 x 4096 x 8, text 768 x 12):
    the shipped config plans every one of them (meta device: nothing allocated)."""
    from core.config import load_experiment
    from core.convert import check

    root = Path(__file__).resolve().parent.parent
    exp = load_experiment(root / "experiments/full/unitok_vitamin_large.yaml", ["losses=[]"])
    with torch.device("meta"):
        model = Tokenizer(exp.model, exp.data.image_size)
    shapes = full_official_shapes()
    ckpt = {k: torch.zeros(s) if k.endswith(("zero_k_bias", "pos_embed")) else torch.empty(s, device="meta") for k, s in shapes.items()}
    mapping = check(ckpt, model)
    assert len(shapes) == 1335 and len(mapping) == 1335 - 8  # 8 vocab_usage buffers are dropped


def full_official_shapes() -> dict[str, tuple]:
    """The same enumeration at UniTok's full size (module constants swapped for the official values)."""
    g = globals()
    saved = {k: g[k] for k in ("C", "L", "STEM", "STAGES", "V", "N_CB", "K", "DEC_STAGES", "DEC_DEPTHS", "TW", "TL", "CTX", "E")}
    g.update(C=1024, L=31, STEM=160, STAGES=(160, 320), V=64, N_CB=8, K=4096, DEC_STAGES=(320, 160), DEC_DEPTHS=(4, 2),
             TW=768, TL=12, CTX=77, E=768)
    try:
        shapes = official_shapes()
        # ViTamin-L's second MbConv stage has 4 blocks (depths (2, 4, 1)); the enumeration above uses CONV_DEPTH for both
        b = "encoder.patch_embed.backbone.stages.1"
        for d in (2, 3):
            shapes.update(_mbconv(f"{b}.{d}", 320, 320, False, inverse=False))
        return shapes
    finally:
        g.update(saved)


def test_layout_without_counterpart_refused(tmp_path, capsys):
    exp = dict(EXPERIMENT, model=dict(MODEL, decoder={"type": "hybrid", "width": C, "depth": L, "heads": HEADS}))
    cfg = tmp_path / "hybrid.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    code = main([str(_write_checkpoint(tmp_path, official_state(distinct=False))), "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.decoder" in err and "hybrid" in err


def test_training_starts_from_a_converted_run(tmp_path, capsys, monkeypatch):
    """``train.resume=<converted run>``: a new run from the official weights (weights only: fresh
    optimizers, step 0), in its own run directory; a later resume continues that new run."""
    from core.checkpoint import list_checkpoints, load_checkpoint
    from core.rundir import run_dir_for
    from core.trainer import train

    monkeypatch.chdir(tmp_path)
    official = official_state(distinct=False)
    out = tmp_path / "converted"
    assert main([str(_write_checkpoint(tmp_path, official)), "--config", str(_write_config(tmp_path)), "--out", str(out),
                 "losses=[]"]) == 0
    converted = load_checkpoint(list_checkpoints(out)[-1])["model"]
    cfg = {**EXPERIMENT, "losses": [{"type": "pixel"}], "eval": [], "tracking": {"enabled": False},
           "data": {**EXPERIMENT["data"], "train_size": 8},
           "train": {"steps": 1, "batch_size": 4, "optimizer": {"lr": 1e-12}, "eval_size": 4, "progress": False,
                     "resume": str(out)}}
    exp = validate(cfg)
    result = train(exp)
    assert result.run_dir == run_dir_for(exp) and "from the weights in" in capsys.readouterr().err
    trained = load_checkpoint(list_checkpoints(result.run_dir)[-1])
    assert trained["step"] == 1 and set(trained["optimizers"]) == {"main"}
    # a learning rate of 1e-12 moves no weight visibly: the run started from the converted ones
    for k, v in converted.items():
        torch.testing.assert_close(trained["model"][k], v, rtol=0, atol=1e-9)
    scratch = Tokenizer(exp.model, exp.data.image_size).state_dict()
    assert any(not torch.allclose(scratch[k[len("model."):]], v) for k, v in converted.items())
    longer = validate({**cfg, "train": {**cfg["train"], "steps": 2, "resume": "auto"}})
    assert train(longer).run_dir == result.run_dir and "resuming" in capsys.readouterr().err
    assert load_checkpoint(list_checkpoints(result.run_dir)[-1])["step"] == 2
