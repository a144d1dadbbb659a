"""Run store: bit-exact round trip, atomic saves, listing, deletion."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch

from probe.io import MARKER
from probe.runs import store as store_mod
from probe.runs.results import AttentionResult
from probe.runs.store import RunStore


def make_result(b: int = 2) -> AttentionResult:
    g = torch.Generator().manual_seed(0)
    arrays = {f"vision.blocks.{i}.attn.pattern": torch.rand(b, 1, 5, 5, generator=g) for i in range(2)}
    arrays["input.image"] = torch.randint(0, 255, (b, 8, 8, 3), dtype=torch.uint8, generator=g)
    return AttentionResult(arrays=arrays, model="m", image_names=[f"i{k}" for k in range(b)],
                           meta={"spans": {"cls": [0, 1], "image": [1, 5]}, "grid": [2, 2]},
                           layers=[0, 1], reduce_heads="mean")


def test_round_trip_is_bit_exact(tmp_path):
    s = RunStore(tmp_path)
    res = make_result()
    fig = plt.figure()
    run = s.save({"analysis": "attention", "model": {"name": "m"}, "seed": 3}, res, {"map": fig})
    back = s.load(run.id)
    assert back.result.to_dict() == res.to_dict()
    assert back.result.arrays.keys() == res.arrays.keys()
    for k, v in res.arrays.items():
        assert back.result.arrays[k].dtype == v.dtype and torch.equal(back.result.arrays[k], v)
    assert back.manifest["seed"] == 3 and "torch" in back.manifest["environment"]
    assert [f.name for f in back.figures] == ["map.png"]
    assert [(r.id, r.status, r.problem) for r in s.list()] == [(run.id, "ok", "")]


def test_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    s = RunStore(tmp_path)
    kept = s.save({"analysis": "attention", "model": {"name": "m"}}, make_result())

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        s.save({"analysis": "attention", "model": {"name": "m"}}, make_result())
    assert [r.id for r in s.list()] == [kept.id]
    assert [p.name for p in tmp_path.iterdir()] == [kept.id]  # staging folder removed too


def test_killed_save_is_invisible_and_cleanable(tmp_path):
    s = RunStore(tmp_path)
    half = tmp_path / ".incomplete-x-k3j9x0aa"  # as atomic_dir names and marks its staging folder
    half.mkdir()
    (half / MARKER).write_text("")
    (half / "result.json").write_text("{")
    nomanifest = tmp_path / "20260101-000000-attention-m-abc"  # no manifest: not a run, never touched
    nomanifest.mkdir()
    (nomanifest / "notes.txt").write_text("mine")
    assert s.list() == []
    for act in (s.load, s.delete):
        with pytest.raises(KeyError, match="is not a probe run"):
            act(nomanifest.name)
    assert (nomanifest / "notes.txt").read_text() == "mine"
    assert half.exists()  # a young staging folder may be a save in progress: listing keeps it
    assert s.clean_incomplete() == 1 and not half.exists()


def test_delete_and_unknown(tmp_path):
    s = RunStore(tmp_path)
    run = s.save({"analysis": "attention", "model": {"name": "m"}}, make_result())
    s.delete(run.id)
    assert s.list() == []
    with pytest.raises(KeyError, match="no run 'nope'"):
        s.delete("nope")


def test_result_checks_shapes_and_schema():
    res = make_result()
    with pytest.raises(ValueError, match="layer 0 pattern"):
        AttentionResult(arrays={"vision.blocks.0.attn.pattern": torch.zeros(3, 5, 5)}, image_names=["a"], layers=[0])
    d = res.to_dict()
    d["schema_version"] = 99
    with pytest.raises(ValueError, match="schema version 99"):
        AttentionResult.from_dict(d, res.arrays)
    maps = res.query_map(1, "cls")
    assert maps.shape == (2, 2, 2)
    torch.testing.assert_close(maps.flatten(1), res.arrays["vision.blocks.1.attn.pattern"][:, 0, 0, 1:5])


def test_a_users_folder_with_its_own_manifest_is_not_a_run(tmp_path, monkeypatch):
    """A hostile pass deleted a browser-extension folder (it has a manifest.json) from a folder used as
    a store: only folders probe wrote are runs."""
    s = RunStore(tmp_path)
    ext = tmp_path / "webext"
    ext.mkdir()
    (ext / "manifest.json").write_text('{"name": "my extension", "version": "1.0"}')
    (ext / "bg.js").write_text("console.log(1)")
    assert s.list() == []
    with pytest.raises(KeyError, match="is not a probe run"):
        s.delete("webext")
    assert (ext / "bg.js").is_file()
    monkeypatch.setenv("PROBE_STORE", "")
    assert RunStore().root.name == "probe-runs"  # an empty variable is unset, not the current folder
