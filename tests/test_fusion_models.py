"""Our own fusion models: MMCA, the cross-attention conditioning block, the prefix VLM."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ViTConfig, ViTModel

from probe.capture import MaskTokens, capture, intervene
from probe.models.cross_attention import (
    CrossAttentionConditioning,
    SingleHeadCrossAttention,
    TextConditionedClassifier,
)
from probe.models.mmca import MMCAAttention, MMCACaptioner, MMCAConfig
from probe.models.prefix_vlm import PrefixDecoderConfig, PrefixVLM, joint_mask
from probe.models.text import CharTokenizer
from probe.train import next_token_loss, train_captioner
from tests.helpers import SiteHooks

TINY_VIT = {"image_size": 16, "patch_size": 4, "dim": 32, "depth": 1, "heads": 2}


# ------------------------------------------------------------------ MMCA


def mmca_patterns(attn, vis, txt, interventions=()):
    hooks = SiteHooks(attn, {"text.blocks.0.attn.pattern": "text_site", "text.blocks.0.xattn.pattern": "cross_site",
                             "text.blocks.0.vision.pattern": "vision_site"})
    with torch.no_grad(), intervene(hooks, list(interventions)), capture(hooks, "*") as cache:
        out = attn(vis, txt)
    return out, cache


def test_mmca_softmaxes_rows_and_causality():
    torch.manual_seed(0)
    attn = MMCAAttention(32, 4).eval()
    vis, txt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    _, c = mmca_patterns(attn, vis, txt)
    tt, ti, vv = c["text.blocks.0.attn.pattern"], c["text.blocks.0.xattn.pattern"], c["text.blocks.0.vision.pattern"]
    assert tt.shape == (2, 4, 5, 5) and ti.shape == (2, 4, 5, 6) and vv.shape == (2, 4, 6, 6)
    for p in (tt, ti, vv):  # each softmax separately sums to 1
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert (tt.triu(1) == 0).all()  # causal text->text


def test_mmca_visual_tokens_never_see_text_and_text_is_causal():
    torch.manual_seed(1)
    attn = MMCAAttention(32, 4).eval()
    vis, txt = torch.randn(1, 6, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        v1, t1 = attn(vis, txt)
        txt2 = txt.clone()
        txt2[:, 3:] += 3.0
        v2, t2 = attn(vis, txt2)
    assert torch.equal(v1, v2)  # visual outputs ignore text entirely
    torch.testing.assert_close(t1[:, :3], t2[:, :3])  # earlier text tokens ignore later ones
    assert not torch.allclose(t1[:, 3:], t2[:, 3:])


def test_mmca_equals_formula_and_blind_baseline_is_finite():
    torch.manual_seed(2)
    attn = MMCAAttention(8, 1).eval()
    vis, txt = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    with torch.no_grad():
        _, t = attn(vis, txt)
        q, k, v = (lambda x: attn.q_proj(x)), (lambda x: attn.k_proj(x)), (lambda x: attn.v_proj(x))
        s = 8**-0.5
        tt = (q(txt) @ k(txt).transpose(1, 2) * s).masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), -1e9)
        ref = torch.softmax(tt, -1) @ v(txt) + torch.softmax(q(txt) @ k(vis).transpose(1, 2) * s, -1) @ v(vis)
        torch.testing.assert_close(t, attn.out_proj(ref), atol=1e-6, rtol=1e-5)
    (_, t_blind), c = mmca_patterns(attn, vis, txt, [MaskTokens([0, 1, 2], attention="text.blocks.0.xattn.pattern")])
    assert (c["text.blocks.0.xattn.pattern"] == 0).all() and torch.isfinite(t_blind).all()
    with torch.no_grad():
        text_only = attn.out_proj(torch.softmax(tt, -1) @ v(txt))
    torch.testing.assert_close(t_blind, text_only, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ conditioning block


def test_conditioning_masks_and_all_masked_rows():
    torch.manual_seed(3)
    blk = CrossAttentionConditioning(8, 6, heads=2).eval()
    x, ctx = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 6)
    pad = torch.tensor([[False, False, False, True, True], [True, True, True, True, True]])
    hooks = SiteHooks(blk, {"vision.blocks.0.xattn.pattern": ""})
    with torch.no_grad(), capture(hooks, "*") as c:
        out = blk(x, ctx, pad)
    p = c["vision.blocks.0.xattn.pattern"]
    assert p.shape == (2, 2, 12, 5)
    assert (p[0][..., 3:] == 0).all() and torch.allclose(p[0].sum(-1), torch.ones(2, 12))
    assert (p[1] == 0).all() and torch.isfinite(out).all()  # every key masked: zeros, no NaN
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    ctx2[1] = -7.0
    with torch.no_grad():
        assert torch.equal(blk(x, ctx2, pad), out)  # masked content never matters
        torch.testing.assert_close(out[1], x[1] + blk.to_out.bias.view(-1, 1, 1))


def test_single_head_equals_multi_head_with_one_head():
    torch.manual_seed(4)
    multi = CrossAttentionConditioning(8, 6, heads=1, head_dim=8).eval()
    single = SingleHeadCrossAttention(8, 6, dim=8).eval()
    single.load_state_dict(multi.state_dict())
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 6)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(single(x, ctx, pad), multi(x, ctx, pad), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ prefix VLM


def tiny_hf_vit() -> ViTModel:
    torch.manual_seed(5)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              image_size=16, patch_size=4))


def test_joint_mask_layout():
    m = joint_mask(2, 3)
    assert m[:2, :2].all() and not m[:2, 2:].any() and m[2:, :2].all()
    assert torch.equal(m[2:, 2:], torch.ones(3, 3, dtype=torch.bool).tril())


def test_prefix_vlm_trains_only_the_projection():
    tok = CharTokenizer.from_corpus(["a red circle", "a blue square"])
    model = PrefixVLM(tiny_hf_vit(), PrefixDecoderConfig(vocab_size=len(tok), d_model=16, depth=1, heads=2))
    assert model.trainable_parameters() == sum(p.numel() for p in model.proj.parameters()) == 32 * 16 + 16
    before = copy.deepcopy(model.state_dict())
    px, ids = torch.randn(2, 3, 16, 16), tok.batch(["a red circle", "a blue square"])
    train_captioner(model, px, ids, steps=2, batch_size=2, progress=False)
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        assert changed == k.startswith("proj."), k


def test_full_size_trainable_count_from_the_module():
    with torch.device("meta"):
        model = PrefixVLM(ViTModel(ViTConfig()), PrefixDecoderConfig(vocab_size=40, d_model=384))
    assert model.trainable_parameters() == 295_296


def test_prefix_masking_image_span_is_exact():
    tok = CharTokenizer.from_corpus(["ab"])
    model = PrefixVLM(tiny_hf_vit(), PrefixDecoderConfig(vocab_size=len(tok), d_model=16, depth=2, heads=2)).eval()
    hooks = SiteHooks(model, {f"text.blocks.{i}.attn.pattern": f"blocks.{i}.attn" for i in range(2)})
    ids = tok.batch(["ab", "ba"])
    n_prefix = model.n_prefix
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        px = torch.randn(2, 3, 16, 16)
        with torch.no_grad(), intervene(hooks, [MaskTokens(list(range(n_prefix)))]), capture(hooks, "*") as c:
            outs.append(model(px, ids))
        for i in range(2):
            p = c[f"text.blocks.{i}.attn.pattern"]
            assert (p[:, :, n_prefix:, :n_prefix] == 0).all()  # text never sees a removed image token
    assert torch.equal(outs[0], outs[1])  # blind: two images, identical logits


# ------------------------------------------------------------------ every model learns


def made_up_caption_data(n=32):
    """Two colours, two captions: red images say 'red', blue images say 'blue'."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    px = torch.randn(n, 3, 16, 16, generator=g) * 0.1
    px[y == 0, 0] += 1.0
    px[y == 1, 2] += 1.0
    texts = ["red" if int(c) == 0 else "blue" for c in y]
    tok = CharTokenizer.from_corpus(texts)
    return px, tok.batch(texts), tok, texts


@pytest.mark.parametrize("family", ["prefix", "mmca"])
def test_captioners_learn_and_generate(family):
    px, ids, tok, texts = made_up_caption_data()
    torch.manual_seed(0)
    if family == "prefix":
        model = PrefixVLM(tiny_hf_vit(), PrefixDecoderConfig(vocab_size=len(tok), d_model=32, depth=1, heads=2,
                                                              train_decoder=True))
    else:
        model = MMCACaptioner(MMCAConfig(vocab_size=len(tok), dim=32, depth=1, heads=2, vision=TINY_VIT))
    with torch.no_grad():
        start = next_token_loss(model(px, ids), ids, ids != 0).item()
    losses = train_captioner(model, px, ids, steps=60, batch_size=16, lr=5e-3, progress=False)
    with torch.no_grad():
        end = next_token_loss(model(px, ids), ids, ids != 0).item()
    assert end < start * 0.3, (start, end, losses[-5:])
    out = [tok.decode(r) for r in model.generate(px[:8], max_new_tokens=8)]
    assert sum(o == t for o, t in zip(out, texts[:8], strict=True)) >= 6, (out, texts[:8])


def test_conditioning_model_learns():
    g = torch.Generator().manual_seed(0)
    tok = CharTokenizer("rb")
    q = torch.randint(0, 2, (64,), generator=g)  # ask about red (r) or blue (b)
    px = torch.rand(64, 3, 16, 16, generator=g)
    label = torch.where(q == 0, px[:, 0].mean((1, 2)) > px[:, 2].mean((1, 2)), px[:, 2].mean((1, 2)) > px[:, 0].mean((1, 2))).long()
    ids = torch.stack([torch.tensor(tok.encode("r" if int(c) == 0 else "b")) for c in q])
    torch.manual_seed(0)
    model = TextConditionedClassifier(len(tok), 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(px, ids), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses[::10]


def test_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer.from_corpus(["a red circle"])
    tok.save(tmp_path / "t.json")
    back = CharTokenizer.load(tmp_path / "t.json")
    assert back.itos == tok.itos and back.decode(back.encode("a red")) == "a red"
    with pytest.raises(ValueError, match=r"\['z'\]"):
        tok.encode("zed")
