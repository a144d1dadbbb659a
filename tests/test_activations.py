"""Activation data sets: rows against a direct capture, 2-process gloo capture == 1-process capture,
resume after an interruption mid-shard (and a kill mid-write), a full disk, what --force may
replace, the process-group backend, and refusals before any work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probe.io  # (also registers models and analyses)
from probe import registry
from probe.analyses.activations import (
    capture_set,
    distributed,
    parse_source,
    process_group_backend,
    rank_device,
    shard_files,
)
from probe.analyses.grounding import patch_coverage
from probe.capture import capture
from probe.cli import main
from probe.data import ImageSet
from probe.data.activations import open_activations, shard_meta
from probe.data.metrics import largest_object
from probe.data.shapes import COLOURS
from probe.types import ProbeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blip():
    return registry.load_model("blip", weights="demo")


def _same_files(a: Path, b: Path) -> None:
    assert shard_files(a) == shard_files(b) and shard_files(a)
    for name in shard_files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())


def test_rows_equal_a_direct_capture_reduced_by_hand(blip, tmp_path):
    ds = capture_set(blip, "shapes:6", tmp_path / "set", groups=["cls", "mean", "object", "text"], shard_size=4,
                     batch_size=3, progress=False)
    images = ImageSet.shapes(6, split="train")
    batch = blip.preprocess(images.images, [s.caption for s in images.samples])
    with torch.no_grad(), capture(blip, ["vision.blocks.1.resid_post", "text.blocks.2.resid_post"]) as cache:
        blip.forward(batch)
    v, t = cache["vision.blocks.1.resid_post"], cache["text.blocks.2.resid_post"]
    np.testing.assert_allclose(ds.load("vision.blocks.1.resid_post", "cls"), v[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ds.load("vision.blocks.1.resid_post", "mean"), v[:, 1:].mean(1).numpy(), atol=1e-5)
    want, colours = [], []
    for i, s in enumerate(images.samples):
        for k, m in enumerate(s.masks):
            under = patch_coverage(m, blip.grid) > 0
            want.append(v[i, 1:][torch.from_numpy(under)].mean(0).numpy())
            colours.append(list(COLOURS).index(s.objects[k].colour))
    np.testing.assert_allclose(ds.load("vision.blocks.1.resid_post", "object"), np.stack(want), atol=1e-5)
    some = np.array([1, 3, 4, len(want) - 1])  # rows of both shards (images 0-3 and 4-5), read as slices
    np.testing.assert_allclose(ds.load("vision.blocks.1.resid_post", "object", rows=some), np.stack(want)[some],
                               atol=1e-5)
    mask = np.zeros(len(want), bool)
    mask[-2:] = True  # rows of the second shard only
    np.testing.assert_allclose(ds.load("vision.blocks.1.resid_post", "object", rows=mask), np.stack(want)[mask],
                               atol=1e-5)
    obj = ds.rows("object")
    assert obj["colour"].tolist() == colours and obj["image"].tolist() == [i for i, s in enumerate(images.samples)
                                                                          for _ in s.objects]
    cls = ds.rows("cls")
    for i, s in enumerate(images.samples):
        j = largest_object(s.masks, s.objects)
        assert cls["colour"][i] == (-1 if j is None else list(COLOURS).index(s.objects[j].colour))
        assert cls["count"][i] == len(s.objects) - 1
    n = batch["attention_mask"].sum(1)
    text = ds.load("text.blocks.2.resid_post", "text")
    ref = torch.cat([t[i, : int(n[i])] for i in range(len(n))]).numpy()
    np.testing.assert_allclose(text, ref, atol=1e-5)
    rows = ds.rows("text")
    ids = torch.cat([batch["input_ids"][i, : int(n[i])] for i in range(len(n))])
    assert rows["type"].tolist() == ids.tolist() == rows["token"].tolist()  # a text row's type is its token id
    # the colour word of the first phrase is labelled with the first object's colour
    first = images.samples[0]
    word = blip._encode_text(first.objects[0].colour)[0]
    pos = ids[: int(n[0])].tolist().index(word)
    assert rows["colour"][pos] == list(COLOURS).index(first.objects[0].colour)
    # the token's place in the caption is text_position; position stays the target (the quadrant)
    assert rows["text_position"].tolist() == [p for i in range(len(n)) for p in range(int(n[i]))]
    (x, y), (w, h) = first.objects[0].centre, first.image.size
    assert rows["position"][pos] == 2 * int(y >= h / 2) + int(x >= w / 2)
    assert set(rows["position"].tolist()) <= {-1, 0, 1, 2, 3}
    assert ds.hooks_with("text") == [f"text.blocks.{i}.resid_post" for i in range(3)]


def test_two_process_gloo_capture_equals_the_one_process_capture(blip, tmp_path):
    args = ["capture", "--model", "blip", "--weights", "demo", "--data", "shapes:40", "--shard-size", "8",
            "--batch-size", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "probe.cli", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_files(tmp_path / "one", tmp_path / "two")
    assert len(shard_files(tmp_path / "two")) == 5


class Interrupt(BaseException):
    pass


def test_an_interrupted_capture_resumes_to_the_same_data_set(blip, tmp_path, monkeypatch):
    kw = dict(groups=["cls", "object", "text"], shard_size=6, batch_size=2, progress=False)
    capture_set(blip, "shapes:20", tmp_path / "ref", **kw)
    real, calls = blip.forward, [0]

    def dying(batch):
        calls[0] += 1
        if calls[0] == 8:  # 3 batches per shard: the second batch of chunk 2, mid-shard
            raise Interrupt
        return real(batch)

    monkeypatch.setattr(blip, "forward", dying)
    with pytest.raises(Interrupt):
        capture_set(blip, "shapes:20", tmp_path / "set", **kw)
    monkeypatch.setattr(blip, "forward", real)
    folder = tmp_path / "set"
    assert shard_files(folder) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert not (folder / "index.json").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ProbeError, match="unfinished capture"):
        open_activations(folder)
    stale = folder / ".shard-000002.safetensors.k9x1ab.tmp"  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half a shard")
    done = shard_files(folder)
    before = {n: (folder / n).stat().st_mtime_ns for n in done}
    capture_set(blip, "shapes:20", folder, **kw)
    assert all((folder / n).stat().st_mtime_ns == t for n, t in before.items())  # done shards were not redone
    assert not stale.exists()
    _same_files(tmp_path / "ref", folder)


def test_a_full_disk_mid_capture_keeps_every_complete_shard(blip, tmp_path, monkeypatch, capsys):
    out = tmp_path / "set"
    real_fdopen, calls = os.fdopen, [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        if str(out) in os.readlink(f"/proc/self/fd/{fd}") and ".shard-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] == 3:
                return Full(f)
        return f

    monkeypatch.setattr(probe.io.os, "fdopen", fdopen)
    args = ["capture", "--model", "blip", "--weights", "demo", "--data", "shapes:20", "--shard-size", "4",
            "--no-progress", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left" in err and "run the same command again" in err and len(err.splitlines()) == 1, err
    assert shard_files(out) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == [".probe-output", "capture.json", *shard_files(out)]
    for name in shard_files(out):
        m = shard_meta(out / name)  # readable, complete
        assert m["images"][1] - m["images"][0] == 4
    monkeypatch.setattr(probe.io.os, "fdopen", real_fdopen)
    assert main(args) == 0  # space freed: the same command finishes it
    assert "resumed: captured 12 new images (8 of 20 were already there)" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "ref")]) == 0
    _same_files(tmp_path / "ref", out)


def test_refusals_are_one_line_and_before_any_work(tmp_path, capsys):
    vit = ["capture", "--model", "vit-standard", "--weights", "demo", "--data", "shapes:4", "--no-progress"]
    cases = [
        ([*vit, "--groups", "text", "--out", str(tmp_path / "a")], "has no text stack"),
        ([*vit, "--hooks", "vision.blocks.*.mlp", "--out", str(tmp_path / "b")], "no hook matches"),
        ([*vit, "--hooks", "vision.blocks.*.attn.pattern", "--out", str(tmp_path / "c")], "no token stream"),
        (["capture", "--model", "blip", "--weights", "demo", "--data", "shapes:4", "--hooks", "text.*.resid_post",
          "--groups", "cls", "--out", str(tmp_path / "d")], "holds no image tokens"),
        ([*vit[:-3], "--data", "shapes:zero", "--out", str(tmp_path / "e")], "shapes:N"),
        ([*vit[:-3], "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f")], "no such folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not Path(argv[argv.index("--out") + 1]).exists()  # nothing was written
    done = tmp_path / "done"
    assert main([*vit, "--out", str(done)]) == 0
    capsys.readouterr()
    assert main([*vit, "--out", str(done)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*vit, "--out", str(done), "--force"]) == 0
    (done / "index.json").unlink()  # an unfinished capture of another plan is not resumed
    assert main([*vit[:-3], "--data", "shapes:5", "--no-progress", "--out", str(done)]) == 2
    assert "different plan" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main([*vit, "--out", str(foreign), "--force"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep"


def test_force_replaces_an_activation_set_and_nothing_else(tmp_path, capsys):
    """--force must never wipe the --data folder it reads, a run or a `probe data shapes` folder."""
    from probe.data.shapes import write_dataset

    shapes = write_dataset(tmp_path / "shapes", 4, progress=False)
    run = tmp_path / "run"  # a saved run: written by probe (marker), not an activation set
    run.mkdir()
    (run / probe.io.MARKER).write_text("")
    (run / "result.json").write_text("{}")
    before = {p: p.read_bytes() for f in (shapes, run) for p in sorted(f.rglob("*")) if p.is_file()}
    vit = ["capture", "--model", "vit-standard", "--weights", "demo", "--no-progress", "--force"]
    for data, out, needle in [(shapes, shapes, "is the --data folder"), (shapes, shapes / "acts", "lies inside"),
                              (shapes / "images", shapes, "contains"),
                              ("shapes:4", shapes, "holds no probe activation data set"),
                              ("shapes:4", run, "holds no probe activation data set")]:
        assert main([*vit, "--data", str(data), "--out", str(out)]) == 2, (data, out)
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for f in (shapes, run) for p in sorted(f.rglob("*")) if p.is_file()} == before
    acts = tmp_path / "acts"
    assert main([*vit, "--data", "shapes:4", "--out", str(acts), "--groups", "cls"]) == 0
    (acts / "notes.txt").write_text("mine")
    assert main([*vit, "--data", "shapes:5", "--out", str(acts), "--groups", "cls"]) == 0  # an activation set: replaced
    assert open_activations(acts).index["n_images"] == 5 and (acts / "notes.txt").read_text() == "mine"


def test_the_process_group_backend_follows_the_capture_device(monkeypatch):
    """gloo for a CPU capture even where CUDA exists; nccl and one GPU per local rank for CUDA."""
    import torch.distributed as dist

    assert process_group_backend("cpu") == "gloo" and process_group_backend(torch.device("cuda", 1)) == "nccl"
    got: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: got.append(("device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: got.append(("backend", backend)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    with distributed(torch.device("cpu")) as (rank, world):
        assert (rank, world) == (1, 2)
    assert got == [("backend", "gloo")]
    got.clear()
    assert rank_device("cuda") == torch.device("cuda", 1) and rank_device("cpu") == torch.device("cpu")
    with distributed(torch.device("cuda")):
        pass
    assert got == [("device", torch.device("cuda", 1)), ("backend", "nccl")]


def test_image_folders_are_unlabelled_and_probe_shapes_folders_are_labelled(tmp_path):
    from probe.data.shapes import write_dataset

    folder = write_dataset(tmp_path / "shapes", 8, progress=False)
    src = parse_source(str(folder))
    assert src.labelled and src.n == 8 + 1 + 1
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted((folder / "images").iterdir())[:3]:
        (plain / p.name).write_bytes(p.read_bytes())
    assert not parse_source(str(plain)).labelled
    vit = registry.load_model("vit-standard", weights="demo")
    ds = capture_set(vit, str(plain), tmp_path / "acts", groups=["cls", "mean"], progress=False)
    assert not ds.labelled and ds.index["rows"] == {"cls": 3, "mean": 3}
    assert (ds.rows("cls")["colour"] == -1).all()
    a = capture_set(vit, str(folder), tmp_path / "from-folder", groups=["object"], progress=False)
    assert a.labelled and (a.rows("object")["colour"] >= 0).all()


def test_a_corrupt_index_or_plan_is_named_in_one_line(tmp_path):
    from probe.data.activations import INDEX_FILE, ActivationSetError, open_activations, read_plan

    (tmp_path / INDEX_FILE).write_text("{bad")
    with pytest.raises(ActivationSetError, match=f"{INDEX_FILE} cannot be read"):
        open_activations(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[1, 2]")
    with pytest.raises(ActivationSetError, match="not a JSON object"):
        open_activations(tmp_path)
    (tmp_path / "capture.json").write_text("\xff not json")
    with pytest.raises(ActivationSetError, match="cannot be read"):
        read_plan(tmp_path)
