"""The store's read-only helpers for viewers (the app): checked paths, lazy array slices, and the
refusal of symbolic links and hostile ids."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from probe.io import MARKER
from probe.runs.store import BrokenRunError, RunIdError, RunStore, UnknownRunError
from tests.test_store import make_result


@pytest.fixture
def saved(tmp_path):
    s = RunStore(tmp_path / "runs")
    run = s.save({"analysis": "attention", "model": {"name": "m"}}, make_result(b=3), {"map": b"\x89PNG fake"})
    return s, run


def test_reads_json_header_and_slices_without_loading_everything(saved):
    s, run = saved
    loaded = s.load(run.id).result
    assert s.read_json(run.id) == json.loads((run.path / "result.json").read_text())
    assert s.read_json(run.id, "manifest.json")["id"] == run.id
    info = s.array_info(run.id)
    assert info["vision.blocks.0.attn.pattern"] == ((3, 1, 5, 5), "F32") and info["input.image"][1] == "U8"
    whole = s.read_array(run.id, "vision.blocks.1.attn.pattern")
    assert isinstance(whole, np.ndarray) and np.array_equal(whole, loaded.arrays["vision.blocks.1.attn.pattern"].numpy())
    part = s.read_array(run.id, "vision.blocks.1.attn.pattern", (2, 0))
    assert part.shape == (5, 5) and np.array_equal(part, whole[2, 0])
    assert np.array_equal(s.read_array(run.id, "input.image", (slice(1, 3),)), loaded.arrays["input.image"][1:3].numpy())
    assert s.read_array(run.id, "input.image", (0,)).dtype == np.uint8
    assert s.run_file(run.id, "figures/map.png").read_bytes() == b"\x89PNG fake"
    with pytest.raises(KeyError, match="no array 'nope'"):
        s.read_array(run.id, "nope")
    with pytest.raises(IndexError):
        s.read_array(run.id, "input.image", (7,))


def test_bfloat16_arrays_read_as_float32(tmp_path):
    s = RunStore(tmp_path)
    res = make_result()
    arrays = {**res.arrays, "vision.blocks.0.attn.pattern": res.arrays["vision.blocks.0.attn.pattern"].bfloat16()}
    run = s.save({"analysis": "attention", "model": {"name": "m"}}, type(res)(**{**res.__dict__, "arrays": arrays}))
    a = s.read_array(run.id, "vision.blocks.0.attn.pattern", (0,))
    assert a.dtype == np.float32 and np.allclose(a, arrays["vision.blocks.0.attn.pattern"][0].float().numpy())


@pytest.mark.parametrize("bad", ["../x", "..", "/etc/passwd", ".hidden", "a/b", "", "x\x00y", "run id"])
def test_hostile_ids_are_refused_before_any_read(saved, bad):
    s, _ = saved
    for call in (s.run_path, s.read_json, s.array_info, lambda i: s.read_array(i, "input.image"),
                 lambda i: s.run_file(i, "result.json")):
        with pytest.raises(RunIdError):
            call(bad)


def test_unknown_run_and_non_run_files(saved):
    s, run = saved
    with pytest.raises(UnknownRunError):
        s.read_json("20990101-000000-x-m-abcdef")
    for name in ("../manifest.json", "figures/../../x.png", "figures/.x.png", "arrays.bin", "figures/a/b.png",
                 "/etc/passwd"):
        with pytest.raises(BrokenRunError):
            s.run_file(run.id, name)
    with pytest.raises(BrokenRunError, match="reads result.json or manifest.json"):
        s.read_json(run.id, "arrays.safetensors")


def test_symlinked_runs_and_files_pointing_outside_are_refused(saved, tmp_path):
    s, run = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = RunStore(outside).save({"analysis": "attention", "model": {"name": "m"}}, make_result())
    link = s.root / "20990101-000000-attention-evil-abcdef"
    link.symlink_to(secret.path, target_is_directory=True)
    listed = {r.id: r for r in s.list()}
    assert listed[link.name].status == "broken" and "symbolic link" in listed[link.name].problem
    for call in (s.run_path, s.read_json, s.array_info, lambda i: s.read_array(i, "input.image"), s.load):
        with pytest.raises(BrokenRunError, match="symbolic link"):
            call(link.name)
    # a real run folder whose files are links out of it
    (run.path / "result.json").rename(run.path / "result.real")
    (run.path / "result.json").symlink_to(secret.path / "result.json")
    with pytest.raises(BrokenRunError, match="symbolic link"):
        s.read_json(run.id)
    (outside / "figs").mkdir()
    (outside / "figs" / "map.png").write_bytes(b"secret")
    os.replace(run.path / "figures", run.path / "figures.real")
    (run.path / "figures").symlink_to(outside / "figs", target_is_directory=True)
    with pytest.raises(BrokenRunError, match="symbolic link"):
        s.run_file(run.id, "figures/map.png")
    s.delete(link.name)  # deleting the link leaves its target alone
    assert secret.path.is_dir() and not link.exists()


def test_corrupt_arrays_are_a_broken_run(saved):
    s, run = saved
    f = run.path / "arrays.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    for call in (s.array_info, lambda i: s.read_array(i, "input.image")):
        with pytest.raises(BrokenRunError, match="cannot be read"):
            call(run.id)
    (run.path / "result.json").write_text("[1, 2")
    with pytest.raises(BrokenRunError, match="not valid JSON"):
        s.read_json(run.id)
    (run.path / "result.json").write_text("[1, 2]")
    with pytest.raises(BrokenRunError, match="holds a list"):
        s.read_json(run.id)


def test_list_without_cleaning_writes_nothing(tmp_path):
    s = RunStore(tmp_path)
    s.save({"analysis": "attention", "model": {"name": "m"}}, make_result())
    stale = tmp_path / ".incomplete-x-k3j9x0aa"
    stale.mkdir()
    (stale / MARKER).write_text("")
    os.utime(stale, (1, 1))  # older than a day: `list()` would remove it
    assert len(s.list(clean=False)) == 1 and stale.is_dir()
    assert len(s.list()) == 1 and not stale.exists()


def test_read_array_reads_only_the_slice(saved, monkeypatch):
    """A slice comes from safetensors' `get_slice`, not from loading the whole tensor."""
    s, run = saved
    import safetensors

    calls = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            calls.append(("slice", name))
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            calls.append(("tensor", name))
            return self.inner.get_tensor(name)

    monkeypatch.setattr("probe.runs.store.safe_open", Spy)
    s.read_array(run.id, "vision.blocks.0.attn.pattern", (1,))
    assert calls == [("slice", "vision.blocks.0.attn.pattern")]
    assert torch.is_tensor(torch.as_tensor(s.read_array(run.id, "input.image")))


def test_only_links_named_like_runs_or_leading_to_probe_output_are_listed(saved, tmp_path):
    """A store chooser pointed at ``/`` must not offer /bin, /lib ... (links) as broken runs to delete."""
    s, run = saved
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (s.root / "bin").symlink_to(mine, target_is_directory=True)  # the user's links
    (s.root / "notes").symlink_to(mine / "notes.txt")
    (s.root / "20990101-000000-attention-m-abcdef").symlink_to(mine, target_is_directory=True)  # named like a run
    (s.root / "elsewhere").symlink_to(run.path, target_is_directory=True)  # leads to probe's output
    listed = {r.id: r for r in s.list(clean=False)}
    assert set(listed) == {run.id, "20990101-000000-attention-m-abcdef", "elsewhere"}
    assert all(listed[i].status == "broken" for i in ("20990101-000000-attention-m-abcdef", "elsewhere"))
    for name in ("bin", "notes"):
        with pytest.raises(UnknownRunError):
            s.delete(name)
        assert (s.root / name).is_symlink()
    assert (mine / "notes.txt").read_text() == "keep"
    assert s.is_probe_run(run.id)
    for name in ("bin", "elsewhere", "20990101-000000-attention-m-abcdef", "../x", "nope"):
        assert not s.is_probe_run(name), name


def test_link_messages_do_not_say_where_the_link_points(saved, tmp_path):
    s, _ = saved
    secret = tmp_path / "very-secret-place"
    secret.mkdir()
    link = s.root / "20990101-000000-attention-evil-abcdef"
    link.symlink_to(secret, target_is_directory=True)
    (problem,) = [r.problem for r in s.list(clean=False) if r.id == link.name]
    assert "symbolic link" in problem and "very-secret-place" not in problem
    with pytest.raises(BrokenRunError) as e:
        s.run_path(link.name)
    assert "very-secret-place" not in str(e.value)


def test_an_unknown_id_deletes_nothing(saved):
    """The error for an unknown id names recent runs; listing them must not clean the store."""
    s, run = saved
    stale = s.root / ".incomplete-x-k3j9x0aa"  # a crashed save's staging folder, two days old
    stale.mkdir()
    (stale / MARKER).write_text("")
    os.utime(stale, (1, 1))
    for call in (s.read_json, s.run_path, s.array_info, s.load, s.delete):
        with pytest.raises(UnknownRunError, match=run.id):
            call("20990101-000000-x-m-abcdef")
    assert stale.is_dir()


def test_figures_are_what_run_file_reads(saved):
    s, run = saved
    figs = run.path / "figures"
    (figs / "a b.png").write_bytes(b"\x89PNG fake")
    (figs / "dir.png").mkdir()
    (figs / "other.png").write_bytes(b"\x89PNG fake")
    assert [f.name for f in s.load(run.id).figures] == ["map.png", "other.png"]
    for f in s.load(run.id).figures:
        assert s.run_file(run.id, f"figures/{f.name}") == f
    with pytest.raises(BrokenRunError):
        s.run_file(run.id, "figures/a b.png")
