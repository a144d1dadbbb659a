"""The transformers captioners (vit-gpt2, blip, git) on tiny configs of their real classes, saved
with `save` (save_pretrained) and loaded through the same code path as hub weights.

Captured patterns are checked against an eager copy's ``output_attentions`` (ViT-GPT2) or against
a recomputation from the module's own query/key projections and a hand-built mask (BLIP, GIT),
during a teacher-forced forward and during ``generate`` with the KV cache.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from probe.capture import capture, intervene, sites
from probe.data import ImageLoadError
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.models.vit_gpt2 import ViTGPT2Adapter
from probe.weights import CheckpointError, WeightsNotFound
from tests.helpers import Touch, hostile_copy

FAMILIES = {"vit-gpt2": ViTGPT2Adapter, "blip": BlipAdapter, "git": GitAdapter}
CAPTIONS = ["a red circle", "a blue square left of a small green triangle"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    out = {}
    for name, cls in FAMILIES.items():
        out[name] = cls.tiny(seed=3).save(root / name)
    return out


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


def load(name, folders):
    return FAMILIES[name].load(weights=str(folders[name]))


@contextmanager
def record_calls(module):
    """Record (args, kwargs) of every call of `module`."""
    calls = []
    h = module.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        yield calls
    finally:
        h.remove()


def softmax_ref(q, k, mask=None):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1)


def heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def causal_and_pad(attn_mask):
    """Bool (b, 1, T, T): causal and key not padding."""
    t = attn_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return (causal[None] & attn_mask.bool()[:, None, :])[:, None]


def git_mask(n_img, attn_mask):
    """Hand-built GIT mask (b, 1, n_img + T, n_img + T): the image block attends bidirectionally
    within itself and never to text; text attends to every image token and causally to text."""
    t = attn_mask.shape[1]
    n = n_img + t
    m = torch.zeros(n, n, dtype=torch.bool)
    m[:n_img, :n_img] = True
    m[n_img:, :n_img] = True
    m[n_img:, n_img:] = torch.ones(t, t, dtype=torch.bool).tril()
    key_ok = torch.cat([torch.ones(attn_mask.shape[0], n_img, dtype=torch.bool), attn_mask.bool()], 1)
    return (m[None] & key_ok[:, None, :])[:, None]


def reference_patterns(name, adapter, batch):
    """name -> reference pattern (b, h, q, k) for every vision and text pattern hook."""
    ref = {}
    m = adapter.model
    if name == "vit-gpt2":
        from transformers import VisionEncoderDecoderModel

        eager = VisionEncoderDecoderModel.from_pretrained(adapter.weights.ref, attn_implementation="eager").eval()
        with torch.no_grad():
            out = eager(pixel_values=batch["pixel_values"], decoder_input_ids=batch["input_ids"],
                        decoder_attention_mask=batch["attention_mask"], output_attentions=True)
        for i, a in enumerate(out.encoder_attentions):
            ref[f"vision.blocks.{i}.attn.pattern"] = a
        for i, a in enumerate(out.decoder_attentions):
            ref[f"text.blocks.{i}.attn.pattern"] = a
        for i, a in enumerate(out.cross_attentions):
            ref[f"text.blocks.{i}.xattn.pattern"] = a
        return ref
    vcfg = adapter.vision_config
    if name == "blip":
        vis = [m.vision_model.encoder.layers[i].self_attn for i in range(vcfg.num_hidden_layers)]
        txt = m.text_decoder.bert.encoder.layer
    else:
        vis = [m.git.image_encoder.vision_model.encoder.layers[i].self_attn for i in range(vcfg.num_hidden_layers)]
        txt = m.git.encoder.layer
    with torch.no_grad(), record_calls_many([*vis, *[lay.attention.self for lay in txt],
                                             *[lay.crossattention.self for lay in txt if hasattr(lay, "crossattention")]]) as rec:
        adapter.forward(batch)
    hv = vcfg.num_attention_heads
    for i, mod in enumerate(vis):
        (a, k), = rec[mod]
        x = a[0] if a else k["hidden_states"]
        if name == "blip":
            b, n, d = x.shape
            q_, k_, _ = mod.qkv(x).reshape(b, n, 3, hv, d // hv).permute(2, 0, 3, 1, 4)
        else:
            q_, k_ = heads(mod.q_proj(x), hv), heads(mod.k_proj(x), hv)
        ref[f"vision.blocks.{i}.attn.pattern"] = softmax_ref(q_, k_)
    ht = adapter.model.config.text_config.num_attention_heads if name == "blip" else adapter.model.config.num_attention_heads
    am = batch["attention_mask"]
    for i, lay in enumerate(txt):
        (a, k), = rec[lay.attention.self]
        x = a[0]
        mask = causal_and_pad(am) if name == "blip" else git_mask(adapter.n_image_tokens, am)
        sa = lay.attention.self
        ref[f"text.blocks.{i}.attn.pattern"] = softmax_ref(heads(sa.query(x), ht), heads(sa.key(x), ht), mask)
        if name == "blip":
            (a, k), = rec[lay.crossattention.self]
            ca = lay.crossattention.self
            enc = k["encoder_hidden_states"]
            ref[f"text.blocks.{i}.xattn.pattern"] = softmax_ref(heads(ca.query(a[0]), ht), heads(ca.key(enc), ht))
    return ref


@contextmanager
def record_calls_many(modules):
    recs, handles = {}, []
    for mod in modules:
        recs[mod] = []
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, k, store=recs[mod]: store.append((a, k)), with_kwargs=True))
    try:
        yield recs
    finally:
        for h in handles:
            h.remove()


def valid_rows(name, adapter, am):
    """Bool (b, q) of query rows that are real tokens (not padding) in the text patterns."""
    if name == "git":
        return torch.cat([torch.ones(am.shape[0], adapter.n_image_tokens, dtype=torch.bool), am.bool()], 1)
    return am.bool()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_patterns_equal_eager(name, folders, images):
    adapter = load(name, folders)
    batch = adapter.preprocess(images, CAPTIONS)
    with torch.no_grad(), capture(adapter, "*.pattern") as cache:
        adapter.forward(batch)
    ref = reference_patterns(name, adapter, batch)
    assert set(ref) == {n for n in cache.names()}, "every pattern hook has a reference"
    for n, r in ref.items():
        got = cache[n]
        assert got.shape == r.shape, n
        if n.startswith("text."):
            rows = valid_rows(name, adapter, batch["attention_mask"])
            got, r = got.transpose(1, 2)[rows], r.transpose(1, 2)[rows]
        torch.testing.assert_close(got, r.float(), atol=ATOL, rtol=0, msg=n)
    assert sites.active_site_count() == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generate_rows_equal_forward_rows_and_caption_unchanged(name, folders, images):
    adapter = load(name, folders)
    plain = adapter.caption(images, max_new_tokens=6)
    caps, cache = adapter.generate_with_cache(images, max_new_tokens=6)
    assert caps["text"] == plain["text"] and torch.equal(caps["ids"], plain["ids"])
    steps = caps["ids"].shape[1]
    assert all(len(cache.calls(n)) == 1 for n in cache.names() if n.startswith("vision."))
    # teacher-forced forward over start + generated[:-1]: its rows are what each step saw
    start = torch.full((len(images), 1), adapter.specials.start)
    ids = torch.cat([start, caps["ids"][:, :-1]], 1)
    batch = {"pixel_values": adapter.preprocess(images)["pixel_values"], "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), capture(adapter, "*.pattern") as full:
        adapter.forward(batch)
    off = adapter.text_offset()
    for n in cache.names():
        if n.startswith("vision."):
            torch.testing.assert_close(cache[n], full[n], atol=ATOL, rtol=0)
            continue
        stacked = cache.stack_calls(n)  # (b, h, steps, keys)
        assert stacked.shape[2] == steps
        want = full[n][:, :, off : off + steps, : stacked.shape[-1]]
        torch.testing.assert_close(stacked, want, atol=ATOL, rtol=0, msg=n)
    assert cache.meta.tokens == caps["tokens"] and cache.meta.flow_hook == adapter.flow_hook
    assert cache.meta.spans["text"] == (off, off + steps)  # the generated tokens


@pytest.mark.parametrize("name", ["vit-gpt2", "blip"])
def test_cross_attention_rows_sum_to_one_over_image_tokens(name, folders, images):
    adapter = load(name, folders)
    _, cache = adapter.generate_with_cache(images, "text.*.xattn.pattern", max_new_tokens=4)
    for n in cache.names():
        p = cache.stack_calls(n)
        assert p.shape[-1] == adapter.n_image_tokens
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)


def test_git_joint_rows_split_between_image_and_text(folders, images):
    adapter = load("git", folders)
    batch = adapter.preprocess(images, CAPTIONS)
    with torch.no_grad(), capture(adapter, "text.blocks.0.attn.pattern") as cache:
        adapter.forward(batch)
    p = cache["text.blocks.0.attn.pattern"]
    n_img = adapter.n_image_tokens
    meta = adapter.input_meta(batch)
    assert meta.spans["text"][0] == n_img and meta.flow_hook == "text.blocks.{i}.attn.pattern"
    assert torch.all(p[:, :, :n_img, n_img:] == 0), "image tokens never attend to text"
    text_rows = p[:, :, n_img:]
    img_mass = text_rows[..., :n_img].sum(-1)
    assert torch.all(img_mass > 0) and torch.all(img_mass < 1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_removed_image_tokens_get_zero_attention_and_equal_deletion(name, folders, images):
    adapter = load(name, folders)
    batch = adapter.preprocess(images, CAPTIONS)
    n = adapter.n_image_tokens
    removed = torch.zeros(len(images), n, dtype=torch.bool)
    removed[:, [0, 3, 4, 9]] = True
    with torch.no_grad(), intervene(adapter, adapter.mask_image_tokens(removed)), \
            capture(adapter, adapter.flow_hook.format(i="*")) as cache:
        logits = adapter.forward(batch)
    for hook in cache.names():
        assert torch.all(cache[hook][..., :n][removed[:, None, None, :].expand_as(cache[hook][..., :n])] == 0), hook
    # reference: the same model with those image tokens deleted
    keep = ~removed[0]
    m = adapter.model
    with torch.no_grad():
        if name == "vit-gpt2":
            enc = m.encoder(pixel_values=batch["pixel_values"]).last_hidden_state
            ref = m.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            encoder_hidden_states=enc[:, keep]).logits
        elif name == "blip":
            enc = m.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
            ref = m.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 encoder_hidden_states=enc[:, keep]).logits
        else:
            h = m.git.visual_projection.register_forward_hook(lambda _m, _a, out: out[:, keep])
            try:
                ref = m(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits[:, int(keep.sum()) :]
            finally:
                h.remove()
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert sites.active_site_count() == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_blind_model_ignores_the_image(name, folders):
    adapter = load(name, folders)
    rng = np.random.default_rng(7)
    a, b = (Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    batch = adapter.preprocess([a, b], [CAPTIONS[1]] * 2)
    with torch.no_grad():
        seeing = adapter.forward(batch)
        with intervene(adapter, adapter.mask_image_tokens()):
            blind = adapter.forward(batch)
    assert not torch.allclose(seeing[0], seeing[1], atol=1e-4), "the images must matter without the mask"
    torch.testing.assert_close(blind[0], blind[1], atol=1e-5, rtol=0)


def test_blip_cross_attention_mask_is_really_dropped_by_transformers(folders, images):
    """Why BLIP needs our routing: the mask it is given has no effect in transformers 5.23."""
    adapter = load("blip", folders)
    batch = adapter.preprocess(images, CAPTIONS)
    m = adapter.model
    with torch.no_grad():
        enc = m.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        ones = torch.ones(enc.shape[:2], dtype=torch.long)
        half = ones.clone()
        half[:, 1:9] = 0
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "encoder_hidden_states": enc}
        a = m.text_decoder(encoder_attention_mask=ones, **kw).logits
        b = m.text_decoder(encoder_attention_mask=half, **kw).logits
    if not torch.equal(a, b):
        pytest.fail("transformers now honours BLIP's cross-attention mask: the routing in models/blip.py "
                    "is no longer needed (keep it harmless or remove it)")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_load_round_trip_gives_identical_captions(name, folders, images, tmp_path):
    a = load(name, folders)
    b = FAMILIES[name].load(weights=str(a.save(tmp_path / "copy")))
    assert a.caption(images, max_new_tokens=5)["ids"].equal(b.caption(images, max_new_tokens=5)["ids"])
    assert b.weights.source == "local" and b.weights.sha256 == a.weights.sha256


def test_batched_captions_equal_one_at_a_time(folders, images):
    adapter = load("blip", folders)
    both = adapter.caption(images, max_new_tokens=5)["text"]
    assert both == [adapter.caption([im], max_new_tokens=5)["text"][0] for im in images]


def test_clear_errors(folders, tmp_path, monkeypatch, images):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound, match="not found; tried local cache.*HF_HUB_OFFLINE"):
        BlipAdapter.load(weights="someone/not-a-cached-model")
    with pytest.raises(WeightsNotFound, match="does not exist"):
        GitAdapter.load(weights=str(tmp_path / "missing"))
    import probe.weights

    monkeypatch.setattr(probe.weights, "ZOO_DIR", tmp_path / "no-zoo")  # a checkout without the bundled zoo
    with pytest.raises(WeightsNotFound, match="no demo weights"):
        ViTGPT2Adapter.load(weights="demo")
    adapter = load("vit-gpt2", folders)
    with pytest.raises(ImageLoadError, match="not an image"):
        adapter.caption([np.zeros((4, 4, 7), dtype=np.uint8)])
    with pytest.raises(ImageLoadError, match="expected a PIL image"):
        adapter.caption(["cat.png"])
    with pytest.raises(ValueError, match="one caption per image"):
        adapter.preprocess(images, "a red circle")


def test_auto_falls_back_to_bundled_demo_weights_and_says_so(folders, monkeypatch, caplog):
    import probe.weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(probe.weights, "demo_path", lambda name: folders[name])
    adapter = GitAdapter.load(weights="auto")
    assert adapter.weights.source == "demo" and adapter.weights.ref == str(folders["git"])
    assert "HF_HUB_OFFLINE" in adapter.weights.note and adapter.weights.sha256
    assert "using the bundled demo weights" in caplog.text
    assert GitAdapter.load(weights="demo").weights.source == "demo"


# ------------------------------------------------------------------ no code, no pickles, no silent gaps
@pytest.mark.parametrize("name", list(FAMILIES))
def test_folder_naming_remote_code_is_refused_before_anything_runs(name, folders, tmp_path):
    marker = tmp_path / "pwned"
    folder = hostile_copy(folders[name], tmp_path / "hostile", marker)
    with pytest.raises(CheckpointError, match="auto_map") as err:
        FAMILIES[name].load(weights=str(folder))
    assert "\n" not in str(err.value) and not marker.exists()


def test_pickle_only_folder_is_refused_with_how_to_convert(folders, tmp_path):
    import pickle
    import shutil

    folder = tmp_path / "bin-only"
    shutil.copytree(folders["blip"], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Touch(marker)}))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*model.safetensors") as err:
        BlipAdapter.load(weights=str(folder))
    assert "\n" not in str(err.value) and not marker.exists()


def test_checkpoint_missing_decoder_tensors_is_an_error(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(folders["blip"], folder)
    state = load_file(str(folder / "model.safetensors"))
    gone = [k for k in state if k.startswith("text_decoder.bert.encoder.layer.1.")]
    save_file({k: v for k, v in state.items() if k not in gone}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{folder}.*missing {len(gone)}") as err:
        BlipAdapter.load(weights=str(folder))
    assert "\n" not in str(err.value)
