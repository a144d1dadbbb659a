"""The faithfulness analysis: words matched to their objects, score rows against the random
baselines, and one-line refusals before any model loads."""

from __future__ import annotations

import pytest
import torch

from probe.analyses import faithfulness as fa
from probe.cli import main
from probe.data import ImageSet
from probe.registry import load_model
from probe.runs.store import RunStore


def test_object_words_follow_the_caption_order():
    adapter = load_model("mmca")
    caption = "a small blue triangle left of a large red circle and a large yellow square"
    ids = adapter.encode_captions([caption])["input_ids"][0, 1:].tolist()  # the generated tokens + end
    words = fa.object_words(adapter, ids, 3)
    assert [(w, k, o) for w, k, o, _ in words] == [
        ("blue", "colour", 0), ("triangle", "shape", 0), ("red", "colour", 1), ("circle", "shape", 1),
        ("yellow", "colour", 2), ("square", "shape", 2)]
    text = adapter._text(ids)
    for w, _, _, step in words:  # the step is the word's first letter (character captioner)
        assert text[step] == w[0] and text[step:].startswith(w)


def test_end_to_end_scores_and_baselines(store_root, capsys):
    argv = ["run", "faithfulness", "--model", "mmca", "--shapes", "4", "--methods", "attention,rollout",
            "--curve-points", "3", "--random-orders", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| attention |" in out and "*random*" in out
    (info,) = RunStore(store_root).list()
    res = RunStore(store_root).load(info.id).result
    assert res.methods == ["attention", "rollout"] and res.words
    metrics = {r["metric"] for r in res.scores}
    assert {"pointing/shape", "energy/colour", "deletion_auc", "insertion_auc"} <= metrics
    for r in res.scores:
        assert set(r) == {"method", "metric", "value", "n", "baseline"}
        if r["metric"].startswith(("pointing", "energy")):
            assert 0 <= r["value"] <= 1 and 0 < r["baseline"] < 1
    # each scored map is the method's map at the word's step, on its image
    from probe.analyses.explain import METHODS, Target

    adapter = load_model("mmca")
    shapes = ImageSet.shapes(4)
    px = adapter.preprocess(shapes.images)["pixel_values"]
    cap = adapter.caption_pixels(px)
    ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
    maps = METHODS["attention"].fn(adapter, Target(px, ids, mask))
    for j, w in enumerate(res.words):
        assert torch.allclose(res.arrays["maps.attention"][j], maps[w["image"], w["step"]], atol=1e-6)


def test_refusals_are_one_line_and_before_loading(store_root, capsys, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    for argv, needle in [
        (["--model", "mmca", "--images", str(img)], "only probe-shapes images carry"),
        (["--model", "mmca", "--methods", "attention,nope"], "known: attention"),
        (["--model", "xattn-cond"], "faithfulness"),
    ]:
        assert main(["run", "faithfulness", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not RunStore(store_root).list()


def _table_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "faithfulness_table.py"
    spec = importlib.util.spec_from_file_location("faithfulness_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_faithfulness_table_is_generated_from_the_current_zoo():
    """Stale when the README block differs from bench/results/faithfulness.json, when a zoo checkpoint
    changed since that file was written, or when the scoring code no longer gives its numbers."""
    import json

    from probe.pipeline import RunSpec, execute

    table = _table_module()
    data = json.loads(table.OUT.read_text())
    assert table.readme_block(table.README.read_text()) == table.render(data), \
        "README faithfulness table is stale: python bench/faithfulness_table.py --readme-only"
    assert data["models"]
    for entry in data["models"]:
        assert load_model(entry["model"], weights="demo").weights.sha256 == entry["sha256"], \
            f"{entry['model']}'s zoo weights changed: rerun python bench/faithfulness_table.py --models {entry['model']}"
    entry = next(e for e in data["models"] if e["model"] == "mmca")
    out = execute(RunSpec(analysis="faithfulness", model="mmca", weights="demo", shapes=data["shapes"], save=False,
                          params={"methods": "attention", "sanity": False}))
    for row in out.result.scores:
        if row["metric"].startswith(("pointing", "energy")):
            (want,) = [r for r in entry["scores"] if r["method"] == "attention" and r["metric"] == row["metric"]]
            assert row["value"] == pytest.approx(want["value"], abs=1e-6), row


def test_more_refusals_name_the_cause(store_root, capsys):
    for argv, needle in [
        (["--model", "mmca", "--methods", ","], "names no method"),
        (["--model", "vit-standard", "--max-new-tokens", "3"], "does not caption"),
    ]:
        assert main(["run", "faithfulness", *argv, "--shapes", "2"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
