"""The Streamlit app, in-process (`streamlit.testing.v1.AppTest`): every page on a store that holds a
run of every analysis (plus a hand-made patching run and a run of a kind the app does not know),
an empty store, corrupt and half-written runs, a symlinked run and hostile run ids in the URL; and
a store of odd entries (the user's links, a folder name that is not UTF-8, odd figures, a date
that is not a date, an attention run fused at capture time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
         "probes", "umap", "logit_lens", "efficiency", "compare", "generic"]
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
    "probes": ["--model", "vit-standard", "--target", "colour", "--tokens", "cls", "--data", "shapes:64",
               "--n-boot", "100"],
    "probes-patches": ["--model", "vit-standard", "--target", "colour", "--tokens", "patches", "--data", "shapes:16",
                       "--n-boot", "50"],
    "representations": ["--model", "git", "--data", "shapes:8"],  # UMAP: numba compiles on the first fit (~25 s)
    "logit-lens": ["--model", "git", "--shapes", "2"],
    "efficiency": ["--tokens", "17,65", "--dim", "32", "--heads", "4", "--rounds", "1", "--linformer-k", "8",
                   "--performer-features", "8", "--nystrom-landmarks", "4", "--patch", "4"],
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
            assert main(["run", name.removesuffix("-approx").removesuffix("-patches"), *flags]) == 0, name
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
             "acts": rng.normal(size=(3, 4, 5)).astype(np.float32), "empty": np.zeros((0, 3), np.float32)})
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
             *(w.value for w in at.warning), *(i.value for i in at.info), *(t.value for t in at.title),
             *(h.value for h in at.subheader)]
    return "\n".join(parts)


def chart_data(at: AppTest, title: str):
    """The data (a DataFrame) of the first chart whose spec holds `title` (Streamlit sends it as Arrow)."""
    import pyarrow as pa

    e = next(e for e in at.get("vega_lite_chart") if title in e.proto.spec)
    return pa.ipc.open_stream(e.proto.datasets[0].data.data).read_all().to_pandas()


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
    assert set(arrays["array"]) == {"umap.xy", "acts", "empty"} and "3 x 4 x 5" in set(arrays["shape"])
    at.selectbox(key="generic.scatter_colour." + UMAP_ID).set_value("modality").run()
    assert not at.exception and any("modality" in s and "circle" in s for s in charts(at))
    at.selectbox(key="generic.array." + UMAP_ID).set_value("acts").run()
    assert len(at.number_input) == 1  # one leading index of a 3-D array
    at.number_input[0].set_value(2).run()
    assert not at.exception and any("acts[2]" in s for s in charts(at))
    at.selectbox(key="generic.array." + UMAP_ID).set_value("empty").run()  # (0, 3): no index to choose
    assert not at.exception and "empty is empty" in texts(at)


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
                      ("probes", ids["probes-patches"]), ("umap", ids["representations"]),
                      ("logit_lens", ids["logit-lens"]), ("efficiency", ids["efficiency"]), ("compare", None),
                      ("generic", UMAP_ID)]:
        at = app(root, page, run=rid)
        assert not at.exception and not at.error, (page, [e.value for e in at.error])
    assert snapshot() == before  # nothing written, not even the stale staging folder cleaned
    for page in ("attention", "generic", "runs"):  # an unknown id: its error names recent runs, and cleans nothing
        at = app(root, page, run="20990101-000000-attention-m-abcdef")
        assert not at.exception
    assert stale.is_dir() and snapshot() == before


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


# ------------------------------------------------------------------------------ the new pages: probes, UMAP, logit lens
def test_probes_page_scores_chart_table_and_patch_maps(store):
    ids = store["ids"]
    at = app(store["root"], "probes", run=ids["probes"])
    assert not at.exception and not at.error
    assert at.selectbox(key="probes.run").value == ids["probes"]
    spec = next(s for s in charts(at) if "Probe of colour from cls tokens" in s)
    assert all(m in spec for m in ("accuracy", "control", "baseline", "selectivity", "ci_lo", "ci_hi"))
    table = next(d.value for d in at.dataframe if "selectivity" in d.value.columns)
    assert list(table["layer"]) == ["vision 0", "vision 1", "vision 2", "vision 3"]
    saved = json.loads((store["root"] / ids["probes"] / "result.json").read_text())["scores"]
    assert np.allclose(table["accuracy"], [s["accuracy"] for s in saved])
    assert np.allclose(table["selectivity"], table["accuracy"] - table["control"], atol=1e-6)
    assert (table["ci_lo"] <= table["accuracy"] + 1e-6).all() and (table["accuracy"] <= table["ci_hi"] + 1e-6).all()
    assert "best layer" in texts(at) and "Accuracy per patch position" not in texts(at)  # cls: no patch maps
    at = app(store["root"], "probes", run=ids["probes-patches"])
    assert not at.exception and not at.error
    assert "Accuracy per patch position" in texts(at)
    assert any("vision 0: accuracy per patch" in s for s in charts(at))
    at.selectbox(key="probes.patch_layer").set_value(3).run()
    assert not at.exception and any("vision 3: accuracy per patch" in s for s in charts(at))
    assert "every layer on one scale (0 to 1); blank: no labelled patch at that position" in captions(at)


def test_umap_page_gap_separability_and_scatter_from_the_arrays(store):
    rid = store["ids"]["representations"]
    at = app(store["root"], "umap", run=rid)
    assert not at.exception and not at.error
    assert "UMAP is for looking" in texts(at)
    table = next(d.value for d in at.dataframe if "separability" in d.value.columns)
    arrays = load_file(str(store["root"] / rid / "arrays.safetensors"))
    assert np.allclose(table["gap"], arrays["gap"].numpy()) and np.allclose(table["separability"],
                                                                              arrays["separability"].numpy())
    assert any("Modality gap" in s and "chance 0.5" in s for s in charts(at))
    points = chart_data(at, "t0: image and text tokens, by modality")  # the stored arrays, as they are
    assert np.allclose(points[["x", "y"]].to_numpy(), arrays["umap.0"].numpy())
    modality = arrays["umap_modality.0"].numpy()
    assert list(points["modality"]) == ["image" if m == 0 else "text" for m in modality]
    at.radio(key="umap.colour").set_value("label").run()
    assert not at.exception
    assert '"shape"' in next(s for s in charts(at) if "t0: image and text tokens, by colour" in s)
    points = chart_data(at, "t0: image and text tokens, by colour")
    colours = ("red", "green", "blue", "yellow")
    assert list(points["label"]) == [colours[c] if c >= 0 else "none" for c in arrays["umap_label.0"].numpy()]
    assert set(points["label"]) & set(colours)
    at.selectbox(key="umap.pair").set_value(2).run()
    assert not at.exception and any("t2: image and text tokens" in s for s in charts(at))
    caption = next(c.value for c in at.caption if c.value.startswith("t2: modality gap"))
    assert f"{float(arrays['gap'][2]):.3f}" in caption


def test_logit_lens_page_grids_and_tokens_over_the_image(store):
    rid = store["ids"]["logit-lens"]
    at = app(store["root"], "logit_lens", run=rid)
    assert not at.exception and not at.error
    specs = charts(at)
    assert any("logit lens on the caption positions" in s and "top-1 = final" in s for s in specs)
    assert any("logit lens on the image tokens" in s for s in specs)
    assert captions(at)[0].startswith("image 0, layer 0: top-1 token per patch")
    result = json.loads((store["root"] / rid / "result.json").read_text())
    top1 = load_file(str(store["root"] / rid / "arrays.safetensors"))["lens.image.top1"]
    layers = next(d.value for d in at.dataframe if "layer" in d.value.columns and len(d.value.columns) == 2)
    first = result["vocab"][str(int(top1[0, 0].mode().values))]
    assert repr(first) in layers.iloc[0, 1]  # the most frequent token of layer 0 is named
    at.selectbox(key="lens.layer").set_value(2).run()
    at.selectbox(key="lens.image").set_value(1).run()
    assert not at.exception and captions(at)[0].startswith("image 1, layer 2: top-1 token per patch")


def test_runs_page_links_every_kind_to_its_page(store):
    ids = store["ids"]
    at = app(store["root"], "runs")
    for kind, title in (("probes", "Probes"), ("representations", "UMAP and modality gap"),
                        ("logit-lens", "Logit lens"), ("efficiency", "Efficiency"), ("attention", "Attention")):
        at.selectbox(key="runs.run").set_value(ids[kind]).run()
        assert any(link.label == f"Open it on the {title} page" for link in at.get("page_link")), kind


# ------------------------------------------------------------------------------ fixes found by a hostile review
def test_compare_every_analysis_kind_draws_both_runs(store):
    at = app(store["root"], "compare")
    kinds = [o.split(" (")[0] for o in at.selectbox(key="compare.kind").options]
    assert {"attention", "flow", "ablation", "attribution", "relevancy", "rollout", "attention-flow", "faithfulness",
            "patching", "ca-params", "probes", "representations", "logit-lens"} <= set(kinds)
    for kind in kinds:
        at.selectbox(key="compare.kind").set_value(kind).run()
        if kind == "attention":  # not the truncated copy (listed as ok, unreadable): that is another test
            at.selectbox(key="compare.a.attention").set_value(store["ids"]["attention"]).run()
            at.selectbox(key="compare.b.attention").set_value(store["ids"]["attention-approx"]).run()
        assert not at.exception, (kind, at.exception)
        assert not at.error, (kind, [e.value for e in at.error])
        assert sum(m.value.startswith(("**A: ", "**B: ")) for m in at.markdown) >= 2, kind
        if kind == "flow":  # one flow run: it is compared with itself, both sides drawn
            assert len(at.image) == 2 and sum("Attention mass on the image" in s for s in charts(at)) == 2


def test_compare_switching_analysis_says_nothing_about_the_previous_run(store):
    at = app(store["root"], "compare")
    at.selectbox(key="compare.kind").set_value("attention").run()
    at.selectbox(key="compare.kind").set_value("ablation").run()
    assert not at.exception and at.selectbox(key="compare.kind").value == "ablation"
    assert not any(" run; this page shows" in i.value for i in at.info), [i.value for i in at.info]
    at = app(store["root"], "compare", run=store["ids"]["flow"])  # opened with a run: its analysis is compared
    assert at.selectbox(key="compare.kind").value == "flow"
    assert at.selectbox(key="compare.a.flow").value == store["ids"]["flow"]
    assert not any("this page shows" in i.value for i in at.info)
    at = app(store["root"], "attention", run=store["ids"]["attention-flow"])
    assert "is an **attention-flow** run" in texts(at)


def test_flow_image_mass_scale_starts_at_zero(store):
    at = app(store["root"], "flow", run=store["ids"]["flow"])
    spec = json.loads(next(s for s in charts(at) if "Attention mass on the image" in s))

    def scales(x):
        if isinstance(x, dict):
            if "scheme" in x:
                yield x
            for v in x.values():
                yield from scales(v)
        elif isinstance(x, list):
            for v in x:
                yield from scales(v)

    (scale,) = [sc for sc in scales(spec) if sc.get("scheme") == "inferno"]
    assert scale["domain"][0] == 0 and scale["domain"][1] > 0


def test_a_row_click_is_not_carried_to_another_run_by_filtering(store):
    ids = store["ids"]
    at = app(store["root"], "runs")

    def table_key() -> str:
        return at.dataframe[0].proto.id.split("-", 2)[2]

    table = at.dataframe[0].value
    shown, kinds = list(table["run"]), list(table["analysis"])
    row = next(i for i in range(2, len(shown)) if kinds[i] != kinds[0])
    clicked = shown[row]
    key, selection = table_key(), {"selection": {"rows": [row], "columns": []}}
    at.session_state[key] = selection
    at.run()
    assert at.selectbox(key="runs.run").value == clicked
    at.multiselect(key="runs.f.analysis").set_value(sorted(set(kinds) - {kinds[0]}))  # the first rows go
    at.session_state[key] = selection  # as a browser does: it sends the table's selection with every rerun
    at.run()
    now = list(at.dataframe[0].value["run"])
    assert now.index(clicked) < row < len(now)
    assert at.selectbox(key="runs.run").value == clicked  # not the run now at the clicked row's position
    at.selectbox(key="runs.run").set_value(ids["attention"]).run()
    at.run()
    assert at.selectbox(key="runs.run").value == ids["attention"]  # an old click does not pull it back


@pytest.fixture
def two_runs(store, tmp_path) -> tuple[Path, str, str]:
    root = tmp_path / "runs"
    root.mkdir()
    a, b = store["ids"]["relevancy"], store["ids"]["rollout"]
    for rid in (a, b):
        shutil.copytree(store["root"] / rid, root / rid)
    return root, a, b


def test_runs_page_follows_the_address_on_arrival_only_and_deletes_the_chosen_run(two_runs):
    root, a, b = two_runs
    at = app(root, "runs", run=a)
    assert at.selectbox(key="runs.run").value == a
    at.selectbox(key="runs.run").set_value(b).run()
    assert at.query_params["run"] == b  # the address follows the choice
    at.button(key="runs.delete").click().run()
    assert at.selectbox(key="runs.run").value == b
    assert any(f"Delete run **{b}**" in w.value for w in at.warning)
    at.button(key="runs.delete_confirm").click().run()
    assert not at.exception
    assert not (root / b).exists() and (root / a).is_dir()


def test_a_pending_delete_is_forgotten_when_the_run_changes(two_runs):
    root, a, b = two_runs
    at = app(root, "runs", run=a)
    at.button(key="runs.delete").click().run()
    assert any("Delete run" in w.value for w in at.warning)
    at.selectbox(key="runs.run").set_value(b).run()
    at.selectbox(key="runs.run").set_value(a).run()
    assert not any("Delete run" in w.value for w in at.warning)
    assert not any(bt.key == "runs.delete_confirm" for bt in at.button)


def test_started_outside_the_repository_the_app_warns_that_it_listens_everywhere(store, tmp_path):
    """Streamlit reads .streamlit/config.toml (server.address = 127.0.0.1) from the folder it is
    started in: from another folder no address is set, and every page says so and how to fix it."""
    code = ("import sys\nfrom streamlit.testing.v1 import AppTest\n"
            f"at = AppTest.from_file({APP!r}, default_timeout={TIMEOUT})\n"
            f"at.session_state['probe.store'] = {str(store['root'])!r}\nat.run()\n"
            "assert not at.exception, at.exception\n"
            "sys.stdout.write('\\n'.join(w.value for w in at.warning))\n")
    here = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert here.returncode == 0, here.stderr[-2000:]
    assert "listens on every network interface" in here.stdout and "--server.address 127.0.0.1" in here.stdout
    if (Path.cwd() / ".streamlit" / "config.toml").is_file():  # pytest run from the repository root: no warning
        at = app(store["root"], "runs")
        assert not any("every network interface" in w.value for w in at.warning)


# ------------------------------------------------------------------------------ a store of odd entries
ODD = {
    "heads": "20261124-130000-attention-vit-standard-a1a1a1",  # one map per head (a copy of the attention run)
    "max": "20261124-130001-attention-vit-standard-b2b2b2",  # the same maps, max-fused at capture time
    "figures": "20261124-130002-attention-vit-standard-c3c3c3",  # odd files in figures/; created 2026-01-02
    "date": "20261124-130003-attention-vit-standard-d4d4d4",  # its `created` is not a date
    "link": "20261124-130004-attention-vit-standard-e5e5e5",  # a link named like a run, to a run outside
}
BAD_NAME = "bad\\udcffname"  # how the app shows the folder b"bad\xffname"


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def odd_store(store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "runs"
    root.mkdir()
    src = store["root"] / store["ids"]["attention"]
    for key in ("heads", "max", "figures", "date"):
        shutil.copytree(src, root / ODD[key])
    arrays = load_file(str(src / "arrays.safetensors"))  # as `probe run attention --reduce max` stores them
    save_file({k: (t.amax(1, keepdim=True).contiguous() if k.endswith(".attn.pattern") else t)
               for k, t in arrays.items()}, str(root / ODD["max"] / "arrays.safetensors"))
    edit_json(root / ODD["max"] / "result.json", reduce_heads="max")
    figs = root / ODD["figures"] / "figures"
    good = sorted(figs.glob("*.png"))[0]
    (figs / "a b.png").write_bytes(good.read_bytes())  # a name run_file refuses
    (figs / "dir.png").mkdir()  # a folder
    (figs / "bad.png").write_bytes(b"not a png at all")
    edit_json(root / ODD["figures"] / "manifest.json", created="2026-01-02T00:00:00+00:00")
    edit_json(root / ODD["date"] / "manifest.json", created="yesterday")
    (root / ODD["link"]).symlink_to(store["outside"] / "secret-run", target_is_directory=True)
    (root / "bin").symlink_to(store["outside"], target_is_directory=True)  # the user's links
    (root / "hostname").symlink_to(store["outside"] / "secret-run" / "manifest.json")
    shutil.copytree(src, os.fsdecode(os.fsencode(root) + b"/bad\xffname"))  # not valid UTF-8
    return root


def test_odd_entries_are_listed_safely_and_never_offered_for_deletion(odd_store):
    at = app(odd_store, "runs")
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert "bin" not in table.index and "hostname" not in table.index  # the user's links are not runs
    assert table.loc[ODD["link"], "status"].startswith("BROKEN") and "symbolic link" in table.loc[ODD["link"], "status"]
    assert table.loc[BAD_NAME, "status"].startswith("BROKEN")
    assert "secret-run" not in " ".join(table["status"])  # where a link points is not shown
    for rid in (ODD["link"], BAD_NAME):
        at.selectbox(key="runs.run").set_value(rid).run()
        assert not at.exception, rid
        assert not any(b.key == "runs.delete" for b in at.button), rid
        assert "does not offer to delete it" in texts(at)
    at.selectbox(key="runs.run").set_value(ODD["heads"]).run()
    assert any(b.key == "runs.delete" for b in at.button)
    for page in ("compare", "generic", "attention"):
        at = app(odd_store, page)
        assert not at.exception, page


def test_a_folder_of_the_users_links_holds_no_runs(store, tmp_path):
    root = tmp_path / "fake-root"
    root.mkdir()
    (root / "bin").symlink_to(store["outside"], target_is_directory=True)
    (root / "usr").mkdir()
    at = app(root, "runs")
    assert not at.exception and not at.dataframe
    assert "holds no probe runs" in texts(at)
    assert any("holds no probe runs" in c.value for c in at.sidebar.caption)


def test_odd_figures_do_not_hide_the_page_or_the_delete_button(odd_store):
    at = app(odd_store, "runs", run=ODD["figures"])
    assert not at.exception and at.selectbox(key="runs.run").value == ODD["figures"]
    shown = captions(at)
    assert "attention_cls.png" in shown and "a b.png" not in shown and "dir.png" not in shown
    assert any("bad.png" in w.value and "not a PNG" in w.value for w in at.warning)
    assert any(b.key == "runs.delete" for b in at.button)
    at = app(odd_store, "attention", run=ODD["figures"])
    assert not at.exception and not at.error


def test_a_created_time_that_is_not_a_date_is_shown_and_the_date_filter_is_kept(odd_store):
    from datetime import date

    at = app(odd_store, "runs")
    assert not at.exception
    assert ODD["date"] in set(at.dataframe[0].value["run"])
    lo, hi = at.slider(key="runs.f.dates").value
    assert lo == date(2026, 1, 2) and hi > lo
    at.slider(key="runs.f.dates").set_value((lo, lo)).run()
    shown = set(at.dataframe[0].value["run"])
    assert ODD["figures"] in shown and ODD["date"] in shown and ODD["heads"] not in shown  # no date: always shown
    at.switch_page("app_pages/attention.py").run()
    at.query_params.clear()
    at.switch_page("app_pages/runs.py").run()
    assert at.slider(key="runs.f.dates").value == (lo, lo)
    assert ODD["heads"] not in set(at.dataframe[0].value["run"])


def test_compare_subtracts_only_the_same_head_choice(odd_store):
    at = app(odd_store, "compare")
    at.selectbox(key="compare.kind").set_value("attention").run()
    at.selectbox(key="compare.a.attention").set_value(ODD["max"]).run()
    at.selectbox(key="compare.b.attention").set_value(ODD["heads"]).run()
    assert not at.exception
    assert at.selectbox(key="compare.att.head").options == ["max (fused at capture)"]
    (diff,) = [c for c in captions(at) if c.startswith("A - B")]
    assert "A: max (fused at capture), B: max over heads" in diff
    assert "mean |difference| 0.0000" in diff  # the same maps, fused the same way
    at.selectbox(key="compare.a.attention").set_value(ODD["heads"]).run()
    at.selectbox(key="compare.b.attention").set_value(ODD["max"]).run()
    at.selectbox(key="compare.att.head").set_value("mean").run()
    assert not at.exception
    assert not [c for c in captions(at) if c.startswith("A - B")]
    assert any("No difference map" in w.value and "mean over heads" in w.value for w in at.warning)
    at.selectbox(key="compare.att.head").set_value("max").run()
    (diff,) = [c for c in captions(at) if c.startswith("A - B")]
    assert "A: max over heads, B: max (fused at capture)" in diff and "mean |difference| 0.0000" in diff


# ------------------------------------------------------------------------------ issue 16: the efficiency study
def test_efficiency_page_reads_the_rows_of_the_study(store):
    at = app(store["root"], "efficiency", run=store["ids"]["efficiency"])
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    assert set(table["kind"]) == {"standard", "merged_qkv", "linformer", "performer", "nystrom", "hybrid"}
    assert {"nystrom-attention", "linformer", "performer-pytorch"} <= set(table["implementation"])
    ours = table[table["implementation"] == "probe"]
    assert (ours["flops"] == ours["flops_closed_form"]).all()
    specs = [e.proto.spec for e in at.get("vega_lite_chart")]
    assert len(specs) == 2 and "forward speed-up" in specs[0] and "peak forward memory" in specs[1]
    at.radio(key="efficiency.scope").set_value("vit").run()
    assert not at.exception
    vit = at.dataframe[-1].value
    assert set(vit["implementation"]) == {"probe"} and (vit["image_size"] > 0).all()
    assert (vit["flops"] == vit["flops_closed_form"]).all()
