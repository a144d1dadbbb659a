"""The Streamlit app, in-process (`streamlit.testing.v1.AppTest`): every page on a store that holds a
run of every analysis (plus a hand-made patching run and a run of a kind the app does not know),
an empty store, corrupt and half-written runs, a symlinked run and hostile run ids in the URL."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from probe.cli import main
from probe.io import MARKER

APP = str(Path(__file__).parents[1] / "app" / "main.py")
PAGES = ["runs", "attention", "flow", "ablation", "attribution", "faithfulness", "patching", "cross_attention",
         "compare", "generic"]
TIMEOUT = 60

RUNS = {  # analysis flags: the smallest settings that exercise each view
    "attention": ["--model", "vit-standard", "--weights", "random", "--shapes", "2", "--reduce", "none"],
    "attention-approx": ["--model", "vit-performer", "--weights", "demo", "--shapes", "2"],
    "flow": ["--model", "blip", "--weights", "demo", "--shapes", "2"],
    "ablation": ["--model", "blip", "--weights", "demo", "--shapes", "2"],
    "ca-params": ["--model", "git,mmca", "--weights", "demo"],
    "rollout": ["--model", "blip", "--weights", "demo", "--shapes", "1", "--max-new-tokens", "4"],
    "attention-flow": ["--model", "vit-standard", "--weights", "demo", "--shapes", "2"],
    "relevancy": ["--model", "mmca", "--weights", "demo", "--shapes", "1", "--max-new-tokens", "4"],
    "attribution": ["--model", "blip", "--weights", "demo", "--shapes", "1", "--methods",
                    "occlusion,integrated-gradients", "--n-steps", "4", "--max-new-tokens", "4"],
    "faithfulness": ["--model", "vit-standard", "--weights", "demo", "--shapes", "2", "--methods",
                     "attention,occlusion"],
}
PATCHING_ID = "20261124-120000-patching-blip-aaaaaa"
UMAP_ID = "20261124-120001-umap-blip-bbbbbb"
TRUNCATED_ID = "20261124-120002-attention-vit-standard-cccccc"
BAD_MANIFEST_ID = "20261124-120003-attention-m-dddddd"
HALF_WRITTEN_ID = "20261124-120004-flow-blip-eeeeee"
LINK_ID = "20261124-120005-attention-evil-ffffff"
REMOVED_ID = "20261124-120006-ablation-blip-a0a0a0"
HOSTILE_IDS = ["../../etc/passwd", "..", "/etc", ".hidden", "a/b", "%2e%2e", LINK_ID, "no-such-run"]


# ------------------------------------------------------------------------------ the store
def raw_run(root: Path, run_id: str, analysis: str, result: dict, arrays: dict[str, np.ndarray]) -> Path:
    """A run folder written by hand (as a future analysis would save it through the store)."""
    p = root / run_id
    p.mkdir(parents=True)
    (p / MARKER).write_text("")
    save_numpy(arrays, str(p / "arrays.safetensors"))
    (p / "result.json").write_text(json.dumps(result))
    (p / "manifest.json").write_text(json.dumps({
        "manifest_version": 1, "id": run_id, "analysis": analysis, "created": "2026-11-24T12:00:00+00:00",
        "model": {"name": "blip"}, "weights": {"source": "demo", "sha256": "0" * 64}, "parameters": {"k": 1}}))
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, object]:
    """A store with one run of every analysis, hand-made runs and broken ones; built once (~10 s)."""
    root = tmp_path_factory.mktemp("store") / "runs"
    outside = tmp_path_factory.mktemp("outside")
    ids: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROBE_STORE", str(root))
        for name, flags in RUNS.items():
            before = {p.name for p in root.glob("*")} if root.exists() else set()
            assert main(["run", name.removesuffix("-approx"), *flags]) == 0, name
            (new,) = {p.name for p in root.glob("*")} - before
            ids[name] = new
    # patching (issue #14's convention): labelled grids in result.json, 2-D arrays of the same names
    raw_run(root, PATCHING_ID, "patching", {
        "kind": "patching", "schema_version": 1, "model": "blip",
        "grids": {"patching.layer_position": {"title": "Logit difference restored by patching",
                                              "rows": ["layer 0", "layer 1", "layer 2"],
                                              "cols": ["tok a", "tok b", "tok a"], "value": "restored"},
                  "patching.heads": {"title": "Per head", "rows": ["L0", "L1"], "cols": ["h0", "h1"],
                                     "value": "restored"}}},
        {"patching.layer_position": np.arange(9, dtype=np.float32).reshape(3, 3) / 8,
         "patching.heads": np.array([[0.1, -0.2], [0.3, np.nan]], dtype=np.float32)})
    # a kind the app has no page for (an embedding with labels, as a UMAP run might store it)
    rng = np.random.default_rng(0)
    raw_run(root, UMAP_ID, "umap", {"kind": "umap", "schema_version": 1, "labels": ["circle", "square"] * 10,
                                    "modality": ["image"] * 10 + ["text"] * 10, "note": "hand-made"},
            {"umap.xy": rng.normal(size=(20, 2)).astype(np.float32),
             "acts": rng.normal(size=(3, 4, 5)).astype(np.float32)})
    # an ablation run that also stored which patches each variant removed (and the images)
    src = root / ids["ablation"]
    shutil.copytree(src, root / REMOVED_ID)
    arrays = load_file(str(src / "arrays.safetensors"))
    variants = json.loads((src / "result.json").read_text())["variants"]
    removed = np.zeros((len(variants), 2, 65), dtype=bool)
    removed[1, :, :] = True
    removed[2, :, 1:9] = True  # top-8: the first row of patches, after CLS
    arrays["ablation.removed"] = torch.from_numpy(removed)
    arrays["input.image"] = load_file(str(root / ids["flow"] / "arrays.safetensors"))["input.image"]
    save_file(arrays, str(root / REMOVED_ID / "arrays.safetensors"))
    m = json.loads((root / REMOVED_ID / "manifest.json").read_text())
    (root / REMOVED_ID / "manifest.json").write_text(json.dumps({**m, "id": REMOVED_ID}))
    # broken: a truncated arrays file (listed as ok, fails when read), a manifest of the wrong
    # shape, a run whose arrays were never written, and a link to a run outside the store
    shutil.copytree(root / ids["attention"], root / TRUNCATED_ID)
    f = root / TRUNCATED_ID / "arrays.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    (root / BAD_MANIFEST_ID).mkdir()
    (root / BAD_MANIFEST_ID / "manifest.json").write_text("[1, 2]")
    shutil.copytree(root / ids["flow"], root / HALF_WRITTEN_ID)
    (root / HALF_WRITTEN_ID / "arrays.safetensors").unlink()
    shutil.copytree(root / ids["attention"], outside / "secret-run")
    (root / LINK_ID).symlink_to(outside / "secret-run", target_is_directory=True)
    return {"root": root, "ids": ids, "outside": outside}


def app(root: Path, page: str | None = None, run: str | None = None, monkeypatch=None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["probe.store"] = str(root)
    at.run()
    assert not at.exception, at.exception
    if page:
        if run is not None:
            at.query_params["run"] = run
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[str]:
    """The Vega-Lite specs the page drew (Altair charts)."""
    return [e.proto.spec for e in at.get("vega_lite_chart")]


def captions(at: AppTest) -> list[str]:
    return [im.caption for i in at.image for im in i.proto.imgs]


def texts(at: AppTest) -> str:
    parts = [*(m.value for m in at.markdown), *(c.value for c in at.caption), *(e.value for e in at.error),
             *(w.value for w in at.warning), *(i.value for i in at.info), *(t.value for t in at.title)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ every page
def test_runs_page_lists_filters_and_shows_a_manifest(store):
    root, ids = store["root"], store["ids"]
    at = app(root, "runs")
    table = at.dataframe[0].value
    assert len(table) == len(ids) + 7 and set(ids.values()) <= set(table["run"])
    broken = table[table["status"].str.startswith("BROKEN")]
    assert set(broken["run"]) == {BAD_MANIFEST_ID, HALF_WRITTEN_ID, LINK_ID}
    assert "symbolic link" in broken.set_index("run").loc[LINK_ID, "status"]
    assert "random-weights" in table.set_index("run").loc[ids["attention"], "tags"]
    assert "approximate" in table.set_index("run").loc[ids["attention-approx"], "tags"]
    at.multiselect(key="runs.f.analysis").set_value(["flow"]).run()
    assert not at.exception
    assert set(at.dataframe[0].value["run"]) == {ids["flow"], HALF_WRITTEN_ID}
    at.selectbox(key="runs.run").set_value(ids["flow"]).run()
    assert any(link.label == "Open it on the Flow and tokens page" for link in at.get("page_link"))
    body = texts(at)
    assert "torch" in body and "sha256" in body and "attention implementation" in body
    assert any("max_new_tokens" in j.value for j in at.json)  # the parameters
    assert any("run" in j.value for j in at.json)  # the timings
    at.selectbox(key="runs.run").set_value(HALF_WRITTEN_ID).run()
    assert not at.exception and any("broken" in e.value and "arrays.safetensors" in e.value for e in at.error)


def test_delete_needs_a_confirmation(store, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    rid = store["ids"]["relevancy"]
    shutil.copytree(store["root"] / rid, root / rid)
    at = app(root, "runs")
    at.button(key="runs.delete").click().run()
    assert (root / rid).is_dir(), "one click must not delete"
    assert any("Delete run" in w.value for w in at.warning)
    at.button(key="runs.delete_cancel").click().run()
    assert (root / rid).is_dir() and not any("Delete run" in w.value for w in at.warning)
    at.button(key="runs.delete").click().run()
    at.button(key="runs.delete_confirm").click().run()
    assert not at.exception
    assert not (root / rid).exists()
    assert any(f"Deleted {rid}" in s.value for s in at.success) or "No runs" in texts(at)


def test_attention_page_heads_queries_layers_and_approximate_marker(store):
    ids = store["ids"]
    at = app(store["root"], "attention", run=ids["attention"])
    assert at.selectbox(key="attention.run").value == ids["attention"]
    assert "random weights" in texts(at)
    assert captions(at)[:2] == ["shapes_test_000: attention of CLS, layer 0",
                                "every layer: CLS, mean over heads (one colour scale)"]
    head = at.selectbox(key="attention.head")
    assert head.options[:3] == ["mean over heads", "max over heads", "min over heads"] and "head 3" in head.options
    head.set_value(2).run()
    query = at.selectbox(key="attention.query")
    assert query.options[0] == "CLS" and "patch r1 c2 (token 11)" in query.options
    query.set_value(11).run()
    at.selectbox(key="attention.layer").set_value(3).run()
    assert not at.exception
    assert captions(at)[:2] == ["shapes_test_000: attention of patch r1 c2 (token 11), layer 3",
                                "every layer: patch r1 c2 (token 11), head 2 (one colour scale)"]
    assert "Effective attention" not in texts(at)
    at.selectbox(key="attention.run").set_value(ids["attention-approx"]).run()
    assert not at.exception and "Effective attention" in texts(at) and "performer" in texts(at)
    assert at.selectbox(key="attention.head").options == ["mean (fused at capture)"]


def test_choices_survive_page_switches(store):
    ids = store["ids"]
    at = app(store["root"], "attention", run=ids["attention"])
    at.selectbox(key="attention.layer").set_value(2).run()
    at.switch_page("app_pages/runs.py").run()
    at.query_params.clear()
    at.switch_page("app_pages/attention.py").run()
    assert not at.exception
    assert at.selectbox(key="attention.run").value == ids["attention"]
    assert at.selectbox(key="attention.layer").value == 2


def test_flow_page_tokens_maps_mass_and_patch_readout(store):
    at = app(store["root"], "flow", run=store["ids"]["flow"])
    pills = at.button_group[0]
    assert pills.options[:4] == ["a", "small", "blue", "triangle"] and len(set(pills.options)) == len(pills.options)
    pills.set_value(2).run()
    assert not at.exception
    assert len(at.image) == 1
    specs = charts(at)
    assert any("Attention mass on the image" in s for s in specs)  # token x layer chart
    assert any("patch column" in s for s in specs)  # the clickable patch grid
    at.selectbox(key="flow.patch").set_value(17).run()
    assert not at.exception
    assert any("pays to patch 17" in s for s in charts(at))
    assert "Tokens reading it most" in texts(at)
    # linked views: a click on a token's row picks the token; a click on a patch picks the patch
    at.session_state["flow.readout_chart"] = {"selection": {"cell": [{"row_i": 3, "col_i": 1}]}}
    at.run()
    assert not at.exception and at.button_group[0].value == 3
    assert captions(at) == ["token 3 'triangle': text->image attention per layer"]
    at.session_state["flow.patch_chart"] = {"selection": {"patch": [{"row_i": 2, "col_i": 5}]}}
    at.run()
    assert not at.exception and at.selectbox(key="flow.patch").value == 21
    assert any("pays to patch 21" in s for s in charts(at))
    at.selectbox(key="flow.image").set_value(1).run()
    assert not at.exception and "a large red circle" in texts(at)


def test_ablation_page_heatmap_drops_captions_and_removed_patches(store):
    at = app(store["root"], "ablation", run=store["ids"]["ablation"])
    specs = charts(at)
    assert any("Log-prob drop per ablated head" in s for s in specs)
    assert any("Drop per variant" in s and "tooltip" in s for s in specs)
    body = texts(at)
    assert "Reference caption" in body and ":red-background[" in body  # changed words highlighted
    # real ablation runs store which tokens each variant removed (ablation.removed) and the images
    assert "did not store which" not in body
    assert any("patches removed" in c for c in captions(at))
    at = app(store["root"], "ablation", run=REMOVED_ID)
    at.selectbox(key="ablation.variant").set_value(2).run()
    assert not at.exception
    assert captions(at) == ["top-8: 8 patches removed"]


def test_attribution_page_every_kind(store):
    ids = store["ids"]
    for kind in ("attribution", "relevancy", "rollout", "attention-flow"):
        at = app(store["root"], "attribution", run=ids[kind])
        assert not at.exception and not at.error, (kind, [e.value for e in at.error])
        assert at.selectbox(key="attribution.run").value == ids[kind]
        assert len(at.image) >= 1, kind
        if kind in ("attribution", "relevancy", "rollout"):  # captioners: the caption as tokens
            at.button_group[0].set_value(1).run()
            assert not at.exception and len(at.image) >= 1
    at = app(store["root"], "attribution", run=ids["attribution"])
    assert "completeness" in texts(at) and "Zeiler" in texts(at)


def test_faithfulness_page(store):
    at = app(store["root"], "faithfulness", run=store["ids"]["faithfulness"])
    table = at.dataframe[0].value
    assert {"attention", "occlusion", "random baseline"} <= set(table.index)
    assert any("Deletion curves" in s for s in charts(at)) and any("Insertion curves" in s for s in charts(at))
    assert len(at.image) == 1 and at.selectbox(key="faithfulness.target").options


def test_patching_page_renders_labelled_grids(store):
    at = app(store["root"], "patching", run=PATCHING_ID)
    assert not at.error
    specs = charts(at)
    assert any("Logit difference restored by patching" in s and "tok b" in s for s in specs)
    assert any("Per head" in s for s in specs)
    values = [d.value for d in at.dataframe]
    assert any(list(v.index) == ["layer 0", "layer 1", "layer 2"] and list(v.columns) == ["0:tok a", "1:tok b", "2:tok a"]
               for v in values)


def test_cross_attention_page_and_fusion_table(store):
    at = app(store["root"], "cross_attention")
    assert not at.error
    tables = [d.value for d in at.dataframe]
    fusion = next(t for t in tables if "fusion" in t.columns)
    assert fusion.loc["git", "fusion"] == "prefix" and fusion.loc["mmca", "fusion"] == "multimodal_causal"
    assert any("cross-attention %" in t.columns for t in tables)
    assert any("per group" in s for s in charts(at))


def test_compare_page_two_attention_kinds(store):
    ids = store["ids"]
    at = app(store["root"], "compare")
    kinds = at.selectbox(key="compare.kind")
    assert kinds.options[:2] == ["ablation (2 runs)", "attention (3 runs)"]  # analyses with two runs first
    kinds.set_value("attention").run()
    at.selectbox(key="compare.a.attention").set_value(ids["attention"]).run()
    at.selectbox(key="compare.b.attention").set_value(ids["attention-approx"]).run()
    assert not at.exception
    diff = at.dataframe[0].value
    assert "vit-performer" in set(diff["B"]) and "vit-standard" in set(diff["A"])
    assert len(at.image) == 3  # A, B and A - B
    assert "effective attention" in texts(at)


def test_generic_page_renders_an_unknown_kind(store):
    at = app(store["root"], "generic", run=UMAP_ID)
    assert not at.error
    arrays = next(d.value for d in at.dataframe if "array" in d.value.columns)
    assert set(arrays["array"]) == {"umap.xy", "acts"} and "3 x 4 x 5" in set(arrays["shape"])
    at.selectbox(key="generic.scatter_colour." + UMAP_ID).set_value("modality").run()
    assert not at.exception and any("modality" in s and "circle" in s for s in charts(at))
    at.selectbox(key="generic.array." + UMAP_ID).set_value("acts").run()
    assert len(at.number_input) == 1  # one leading index of a 3-D array
    at.number_input[0].set_value(2).run()
    assert not at.exception and any("acts[2]" in s for s in charts(at))


def test_every_page_on_an_empty_store(tmp_path):
    for page in PAGES:
        at = app(tmp_path / "nothing-here", page)
        assert not at.exception and not at.error, page
        assert "No " in texts(at), page


# ------------------------------------------------------------------------------ broken runs and hostile ids
def test_a_corrupt_or_half_written_run_is_shown_as_such(store):
    at = app(store["root"], "attention", run=TRUNCATED_ID)
    assert not at.exception
    assert any("cannot be read" in e.value and "arrays.safetensors" in e.value for e in at.error)
    for rid in (BAD_MANIFEST_ID, HALF_WRITTEN_ID):
        at = app(store["root"], "generic", run=rid)
        assert not at.exception and any("broken" in e.value for e in at.error), rid
    at = app(store["root"], "flow")
    at.selectbox(key="flow.run").set_value(HALF_WRITTEN_ID).run()
    assert not at.exception and any("arrays.safetensors is missing" in e.value for e in at.error)


def test_hostile_run_ids_never_leave_the_store(store):
    for page, rid in [("attention", r) for r in HOSTILE_IDS] + [(p, r) for p in PAGES for r in HOSTILE_IDS[:1]]:
        at = app(store["root"], page, run=rid)
        assert not at.exception, (page, rid)
        body = texts(at)
        expected = "not a run listed here" if page == "runs" else "was not opened"
        assert expected in body, (page, rid, body[:300])
        if rid == LINK_ID:
            assert "symbolic link" in body
        if rid in ("no-such-run", LINK_ID):
            continue
        assert "is not a run id" in body or page == "runs", (page, rid)


# ------------------------------------------------------------------------------ read-only, no models
def test_pages_read_only_and_never_load_a_model(store, monkeypatch):
    import probe.registry

    def refuse(*a, **k):
        raise AssertionError("the app loaded a model")

    monkeypatch.setattr(probe.registry, "load_model", refuse)
    root = store["root"]
    stale = root / ".incomplete-x-k3j9x0aa"  # a crashed save's staging folder, two days old
    stale.mkdir(exist_ok=True)
    (stale / MARKER).write_text("")
    os.utime(stale, (1, 1))

    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}

    before = snapshot()
    ids = store["ids"]
    for page, rid in [("runs", None), ("attention", ids["attention"]), ("flow", ids["flow"]),
                      ("ablation", REMOVED_ID), ("attribution", ids["attribution"]),
                      ("faithfulness", ids["faithfulness"]), ("patching", PATCHING_ID), ("cross_attention", None),
                      ("compare", None), ("generic", UMAP_ID)]:
        at = app(root, page, run=rid)
        assert not at.exception and not at.error, (page, [e.value for e in at.error])
    assert snapshot() == before  # nothing written, not even the stale staging folder cleaned


def test_readonly_mode_has_no_delete_and_no_store_chooser(store, monkeypatch):
    monkeypatch.setenv("PROBE_APP_READONLY", "1")
    monkeypatch.setenv("PROBE_STORE", str(store["root"]))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["probe.store"] = "/somewhere/else"  # ignored when read-only
    at.run()
    assert not at.exception
    assert not at.sidebar.text_input and "read-only" in " ".join(c.value for c in at.sidebar.caption)
    assert len(at.dataframe[0].value) > 10  # the store of $PROBE_STORE
    assert not any(b.key == "runs.delete" for b in at.button) and "Deleting is off" in texts(at)
