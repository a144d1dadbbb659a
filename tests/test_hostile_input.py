"""Issue 17, "Nothing lost, nothing run, nothing wrong saved": hostile paths, run ids, run folders,
images and data sets. Imports only the io, runs and data layers (and probe.types)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.data.images import (
    DatasetError,
    ImageLoadError,
    ImageTooLargeError,
    load_cifar10,
    load_labelled,
    open_rgb,
    to_rgb,
)
from probe.data.shapes import read_dataset, write_dataset
from probe.io import MARKER, OutputExistsError, atomic_dir
from probe.runs.results import AttentionResult
from probe.runs.store import BrokenRunError, RunIdError, RunStore, UnknownRunError
from probe.types import ProbeError

ENV = {"python": "test"}  # a manifest with an environment: saving does not import transformers


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, ProbeError) and msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ 1. output folders are never wiped


@pytest.fixture
def user_folder(tmp_path) -> Path:
    d = tmp_path / "d"
    (d / "images").mkdir(parents=True)
    (d / "thesis.txt").write_text("four years of work")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(d / "images" / "mine.png")
    return d


def test_write_dataset_refuses_a_non_empty_folder(user_folder):
    with pytest.raises(OutputExistsError, match="pass --force to replace it") as e:
        write_dataset(user_folder, 8, progress=False)
    assert str(user_folder) in one_line(e) and isinstance(e.value, FileExistsError)
    assert (user_folder / "thesis.txt").read_text() == "four years of work"
    assert (user_folder / "images" / "mine.png").is_file()
    assert sorted(p.name for p in user_folder.parent.iterdir()) == ["d"]  # no staging folder left


def test_force_replaces_only_probe_output_and_only_once_the_new_folder_is_complete(user_folder, tmp_path):
    # a folder of the user's is never replaced, not even with --force (a hostile pass replaced probe/assets)
    with pytest.raises(OutputExistsError, match="not written by probe") as e:
        write_dataset(user_folder, 8, progress=False, force=True)
    one_line(e)
    assert (user_folder / "thesis.txt").read_text() == "four years of work"

    out = tmp_path / "out"
    write_dataset(out, 4, progress=False)
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:
        (tmp / "half").write_text("x")
        assert (out / "annotations.jsonl").is_file()  # still there while the new one is written
        raise RuntimeError("crash while writing")
    assert (out / "annotations.jsonl").is_file() and not (out / "half").exists()
    write_dataset(out, 8, progress=False, force=True)
    assert len(read_dataset(out)) == 8 + 1 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]  # no .old-* or .incomplete-* left


def test_a_file_at_the_target_is_refused_even_with_force_and_an_empty_folder_is_fine(tmp_path):
    f = tmp_path / "f"
    f.write_text("keep")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="is a file") as e:
            write_dataset(f, 8, progress=False, force=force)
        one_line(e)
    assert f.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, 8, progress=False)
    assert (empty / "annotations.jsonl").is_file()


# ------------------------------------------------------------------ 2. run ids are checked by the store


def make_result() -> AttentionResult:
    g = torch.Generator().manual_seed(0)
    arrays = {"vision.blocks.0.attn.pattern": torch.rand(1, 1, 5, 5, generator=g)}
    return AttentionResult(arrays=arrays, model="m", image_names=["i0"],
                           meta={"spans": {"cls": [0, 1], "image": [1, 5]}, "grid": [2, 2]}, layers=[0])


def save(store: RunStore, **kw):
    return store.save({"analysis": "attention", "model": {"name": "m"}, "environment": ENV}, make_result(), **kw)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A folder outside the store that looks like a run."""
    v = tmp_path / "victim"
    save(RunStore(tmp_path / "elsewhere"), run_id="victim")
    (tmp_path / "elsewhere" / "victim").rename(v)
    return v


@pytest.mark.parametrize("run_id", ["a/../../victim", "../victim", "ABS", ".hidden", "..", "", "a b", "x\n"])
@pytest.mark.parametrize("op", ["load", "delete"])
def test_run_ids_that_leave_the_store_are_refused(tmp_path, victim, run_id, op):
    store = RunStore(tmp_path / "store")
    save(store)
    run_id = str(victim) if run_id == "ABS" else run_id
    with pytest.raises(RunIdError, match="is not a run id") as e:
        getattr(store, op)(run_id)
    one_line(e)
    assert (victim / "manifest.json").is_file() and (victim / "arrays.safetensors").is_file()
    assert [r.status for r in store.list()] == ["ok"]


def test_a_symlinked_run_is_broken_and_delete_removes_the_link_only(tmp_path, victim):
    store = RunStore(tmp_path / "store")
    ok = save(store)
    (store.root / "linked").symlink_to(victim, target_is_directory=True)
    runs = {r.id: r for r in store.list()}
    assert runs[ok.id].status == "ok"
    assert runs["linked"].status == "broken" and "symbolic link" in runs["linked"].problem
    assert runs["linked"].figures == [] and runs["linked"].manifest == {}
    with pytest.raises(BrokenRunError, match="symbolic link") as e:
        store.load("linked")
    one_line(e)
    store.delete("linked")
    assert sorted(p.name for p in store.root.iterdir()) == [ok.id]  # no link, no .deleting-* left
    assert (victim / "manifest.json").is_file() and (victim / "arrays.safetensors").is_file()


def test_unknown_run_is_a_one_line_key_error(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(UnknownRunError, match="no run 'nope'") as e:
        store.delete("nope")
    assert isinstance(e.value, KeyError) and not one_line(e).startswith('"')


# ------------------------------------------------------------------ 3. one bad run never breaks the store


BAD_MANIFESTS = {
    "not-json": "{",
    "a-list": "[1, 2]",
    "no-analysis": json.dumps({"id": "x", "created": "2026", "model": {"name": "m"}}),
    "model-a-string": json.dumps({"id": "x", "analysis": "a", "created": "2026", "model": "m"}),
    "model-without-name": json.dumps({"id": "x", "analysis": "a", "created": "2026", "model": {}}),
    "created-a-number": json.dumps({"id": "x", "analysis": "a", "created": 5, "model": {"name": "m"}}),
}


def test_bad_runs_are_listed_as_broken_and_can_be_deleted(tmp_path):
    store = RunStore(tmp_path)
    ok = save(store)
    for name, text in BAD_MANIFESTS.items():
        save(store, run_id=name)
        (tmp_path / name / "manifest.json").write_text(text)
    save(store, run_id="no-arrays")
    (tmp_path / "no-arrays" / "arrays.safetensors").unlink()
    runs = store.list()
    assert runs[0].id == ok.id and runs[0].status == "ok" and runs[0].problem == ""
    broken = {r.id: r.problem for r in runs[1:]}
    assert set(broken) == {*BAD_MANIFESTS, "no-arrays"} and all(r.status == "broken" for r in runs[1:])
    assert "not valid JSON" in broken["not-json"] and "not an object" in broken["a-list"]
    assert "'analysis'" in broken["no-analysis"] and "'model'" in broken["model-a-string"]
    assert "'created'" in broken["created-a-number"] and broken["no-arrays"] == "arrays.safetensors is missing"
    for run_id, problem in broken.items():
        with pytest.raises(BrokenRunError) as e:
            store.load(run_id)
        assert problem in one_line(e) and run_id in str(e.value)
        store.delete(run_id)
    assert [r.id for r in store.list()] == [ok.id]


def test_corrupt_arrays_are_found_on_load_and_do_not_block_delete(tmp_path):
    store = RunStore(tmp_path)
    run = save(store)
    (run.path / "arrays.safetensors").write_bytes(b"\xff" * 64)
    assert [r.status for r in store.list()] == ["ok"]  # listing reads manifests only
    with pytest.raises(BrokenRunError, match="arrays.safetensors cannot be read") as e:
        store.load(run.id)
    one_line(e)
    (run.path / "arrays.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")  # header larger than the file
    with pytest.raises(BrokenRunError, match="arrays.safetensors"):
        store.load(run.id)
    store.delete(run.id)
    assert store.list() == []


def test_figures_that_are_links_or_leave_the_run_are_not_returned(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    store = RunStore(tmp_path / "store")
    run = save(store, figures={"map": b"\x89PNG"})
    (run.path / "figures" / "evil.png").symlink_to(secret)
    assert [f.name for f in store.load(run.id).figures] == ["map.png"]
    assert [f.name for f in store.list()[0].figures] == ["map.png"]
    other = save(store)
    (other.path / "figures").symlink_to(tmp_path, target_is_directory=True)  # a folder link out of the run
    assert store.load(other.id).figures == []


def test_listing_removes_stale_staging_folders_only(tmp_path, caplog):
    store = RunStore(tmp_path)
    run = save(store)
    old = time.time() - 2 * 24 * 3600
    for name in (".incomplete-a-1x2y3z4w", ".deleting-b-a1b2c3", ".old-c-0f1e2d3c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MARKER).write_text("x")  # what probe's staging folders hold
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".incomplete-young-4abcdefg").mkdir()  # a save may be in progress
    (tmp_path / ".keep").mkdir()  # not ours
    for name in (".old-myconfig-abcdef", ".incomplete-notes.txt"):  # the user's, named alike: never touched
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine").write_text("keep")
        os.utime(tmp_path / name, (old, old))
    with caplog.at_level(logging.INFO, logger="probe.runs.store"):
        assert [r.id for r in store.list()] == [run.id]
    assert [r.getMessage() for r in caplog.records] == [f"removed 3 stale staging folders from {tmp_path}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".incomplete-notes.txt", ".incomplete-young-4abcdefg",
                                                          ".keep", ".old-myconfig-abcdef", run.id]


# ------------------------------------------------------------------ 4. images


def png(w: int, h: int, rows: int | None = None) -> bytes:
    """A black 8-bit grey PNG declaring w x h, with `rows` rows of pixel data (default all),
    compressed row by row so that the full image never exists in memory."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    z = zlib.compressobj(9)
    row = bytes(w + 1)  # filter byte + w pixels
    idat = b"".join(z.compress(row) for _ in range(h if rows is None else rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


PROBE_BOMB = """
import json, resource, sys, time
from probe.data.images import ImageTooLargeError, open_rgb
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    open_rgb(sys.argv[1])
    error = None
except ImageTooLargeError as e:
    error = str(e)
seconds = time.perf_counter() - t0
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
mib = grown / 2**20 if sys.platform == "darwin" else grown / 2**10  # bytes on macOS, KiB on Linux
print(json.dumps({"error": error, "seconds": seconds, "peak_growth_mib": mib}))
"""


def test_a_small_png_declaring_a_huge_image_is_refused_fast_and_small(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(10_000, 10_000))
    assert bomb.stat().st_size < 120_000
    # a fresh process, so that its peak resident memory starts from this measurement
    out = subprocess.run([sys.executable, "-c", PROBE_BOMB, str(bomb)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    logging.getLogger(__name__).info("bomb PNG: %.4f s, peak memory growth %.1f MiB", m["seconds"], m["peak_growth_mib"])
    assert m["error"] and "bomb.png" in m["error"] and "10000x10000" in m["error"] and "50,000,000" in m["error"]
    assert m["seconds"] < 1.0 and m["peak_growth_mib"] < 200


def test_pillow_decompression_bomb_becomes_the_same_one_line_error(tmp_path):
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png(30_000, 30_000, rows=1))
    with pytest.raises(ImageTooLargeError) as e:
        open_rgb(tiny)
    msg = one_line(e)
    assert "tiny.png" in msg and f"{tiny.stat().st_size:,} bytes" in msg
    assert "900,000,000 pixels" in msg and "limit of 50,000,000" in msg and "PROBE_MAX_IMAGE_PIXELS" in msg


def test_pixel_cap_comes_from_the_environment(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.new("RGB", (30, 20)).save(p)
    monkeypatch.setenv("PROBE_MAX_IMAGE_PIXELS", "599")
    with pytest.raises(ImageTooLargeError, match="30x20 = 600 pixels, over the limit of 599"):
        open_rgb(p)
    monkeypatch.setenv("PROBE_MAX_IMAGE_PIXELS", "600")
    assert open_rgb(p).size == (30, 20)
    monkeypatch.setenv("PROBE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ProbeError, match="PROBE_MAX_IMAGE_PIXELS='lots'"):
        open_rgb(p)


def test_large_jpeg_is_decoded_at_reduced_size_when_a_size_is_given(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (200, 30, 30)).save(p, quality=90)
    assert open_rgb(p).size == (2000, 1600)
    small = open_rgb(p, 64)
    assert small.size == (250, 200) and small.mode == "RGB"  # 1/8 scale, still >= 64 on both sides
    assert open_rgb(p, (300, 300)).size == (500, 400)  # 1/4: 1/8 would be smaller than asked


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (30, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white left third
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90 degrees clockwise
    im.save(tmp_path / "r.png", exif=exif)
    out = np.asarray(open_rgb(tmp_path / "r.png"))
    assert out.shape == (30, 20, 3)
    assert (out[:10] == 255).all() and (out[10:] == 0).all()  # the left third is now the top third


def test_float_images_with_nan_or_inf_are_refused(tmp_path):
    a = np.full((6, 5), 0.5, dtype=np.float32)
    a[2, 3] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageLoadError, match="nan.tif: float image has 1 NaN") as e:
        open_rgb(tmp_path / "nan.tif")
    one_line(e)
    a[2, 3] = np.inf
    with pytest.raises(ImageLoadError, match="1 infinite"):
        to_rgb(a)
    with pytest.raises(ImageLoadError, match="NaN"):
        to_rgb(np.full((4, 4, 3), np.nan))


@pytest.mark.parametrize(("values", "expected"), [
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # in [0, 1]: times 255
    ([0.0, 100.4, 255.0], [0, 100, 255]),  # in [0, 255]: 8-bit values, rounded
    ([-1.0, 0.0, 1.0], [0, 128, 255]),  # otherwise: min-max
    ([1000.0, 1500.0, 2000.0], [0, 128, 255]),
    ([500.0, 500.0, 500.0], [0, 0, 0]),  # constant outside [0, 255]: black
])
def test_finite_float_images_follow_the_stated_rule(tmp_path, values, expected):
    a = np.array([values], dtype=np.float32)
    assert np.asarray(to_rgb(a))[0, :, 0].tolist() == expected
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    assert np.asarray(open_rgb(tmp_path / "f.tif"))[0, :, 1].tolist() == expected


# ------------------------------------------------------------------ 5. CIFAR labels   6. no test split


def write_batch(path: Path, n_images: int, labels: list) -> None:
    data = np.random.default_rng(0).integers(0, 255, (n_images, 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, f, protocol=2)


def test_cifar_batch_with_fewer_labels_than_images_is_refused(tmp_path):
    write_batch(tmp_path / "data_batch_1", 6, [1, 2, 3, 4, 5, 6])
    write_batch(tmp_path / "data_batch_2", 6, [1, 2, 3, 4, 5])
    with pytest.raises(DatasetError, match="data_batch_2: 6 images but 5 labels") as e:
        load_cifar10(tmp_path, "train")
    one_line(e)
    write_batch(tmp_path / "data_batch_2", 6, [1, 2, 3, 4, 5, 10])
    with pytest.raises(DatasetError, match="labels run from 1 to 10 but there are 10 classes"):
        load_cifar10(tmp_path, "train")


def class_folders(root: Path, n: int = 2) -> None:
    for c, col in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), col).save(root / c / f"{i}.png")


def test_a_flat_folder_has_no_test_split(tmp_path):
    class_folders(tmp_path)
    train = load_labelled(tmp_path, "train", 8)
    assert train.classes == ["cat", "dog"] and len(train) == 4
    with pytest.raises(DatasetError, match="has no test/ split") as e:
        load_labelled(tmp_path, "test", 8)
    assert f"{tmp_path}/test/<class>/" in one_line(e)


def test_train_and_test_folders(tmp_path):
    class_folders(tmp_path / "train", 3)
    class_folders(tmp_path / "test", 1)
    assert len(load_labelled(tmp_path, "train", 8)) == 6 and len(load_labelled(tmp_path, "test", 8)) == 2
    only_test = tmp_path / "only"
    class_folders(only_test / "test")
    with pytest.raises(DatasetError, match="has no train/ split"):  # never "test" read as a class
        load_labelled(only_test, "train", 8)
