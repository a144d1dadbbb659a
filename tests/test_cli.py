"""The CLI end to end, in process, on tiny models and images the tests make."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from probe.cli import main
from probe.runs.store import RunStore


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img.png"
    arr = np.zeros((50, 70, 4), dtype=np.uint8)
    arr[10:30, 20:50] = (255, 0, 0, 255)
    Image.fromarray(arr, "RGBA").save(p)
    return p


def test_run_attention_end_to_end(store_root, image, capsys):
    assert main(["run", "attention", "--model", "vit-performer", "--weights", "random", "--images", str(image),
                 "--seed", "1", "--rows", "cls"]) == 0
    out = capsys.readouterr().out
    assert "saved run" in out and "effective attention" in out
    runs = RunStore(store_root).list()
    assert len(runs) == 1
    run = RunStore(store_root).load(runs[0].id)
    m = run.manifest
    assert m["model"]["name"] == "vit-performer" and m["weights"]["source"] == "random"
    assert m["attn_implementation"] == "performer" and m["seed"] == 1 and m["dtype"] == "float32"
    assert set(m["timings_s"]) == {"load", "run", "render"}
    assert run.result.rows == [0] and run.result.approximate
    assert run.result.pattern(0).shape == (1, 1, 1, 65)
    assert [f.name for f in run.figures] == ["attention_cls.png"]
    assert main(["runs"]) == 0 and runs[0].id in capsys.readouterr().out
    assert main(["runs", "--show", runs[0].id]) == 0
    assert json.loads(capsys.readouterr().out.split("\n/")[0])["id"] == runs[0].id


def test_default_run_uses_bundled_images(store_root, capsys):
    assert main(["run", "attention", "--out", str(store_root)]) == 0
    run = RunStore(store_root).list()[0]
    assert len(run.manifest["images"]) == 4


def test_unknown_model_lists_known(store_root, capsys):
    assert main(["run", "attention", "--model", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe: error: unknown model 'nope'") and "vit-performer" in err and "hf-vit" in err
    assert len(err.splitlines()) == 1


def test_corrupt_image_is_one_clear_line(store_root, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert main(["run", "attention", "--images", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err and "Traceback" not in err
    assert RunStore(store_root).list() == []


def test_models_lists_capabilities(capsys):
    assert main(["models", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["vit-nystrom"]["attention_weights"] == "effective"
    assert d["vit-standard"]["attention_weights"] == "exact" and d["hf-vit"]["fusion"] == "none"


def write_two_class_cifar(folder, n=64):
    """Red-left vs blue-right images in the CIFAR-10 python format: learnable in a few steps."""
    import pickle

    rng = np.random.default_rng(0)
    folder.mkdir()
    labels = rng.integers(0, 2, n)
    imgs = rng.integers(0, 60, (n, 32, 32, 3), dtype=np.uint8)
    imgs[labels == 0, :, :16, 0] = 230
    imgs[labels == 1, :, 16:, 2] = 230
    data = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": labels.tolist(), b"data": data}, f, protocol=2)


def test_train_then_analyse_checkpoint(tmp_path, store_root, capsys):
    data = tmp_path / "cifar"
    write_two_class_cifar(data)
    ckpt = tmp_path / "ckpt"
    assert main(["train", "vit", "--attention", "nystrom", "--data", str(data), "--out", str(ckpt),
                 "--epochs", "6", "--batch-size", "16", "--dim", "32", "--depth", "2", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out
    card = json.loads((ckpt / "config.json").read_text())
    assert card["metrics"]["test_top1"] >= 0.9, card["metrics"]
    assert card["metrics"]["test_top5"] == 1.0  # two classes: top-5 is capped at top-2
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (230, 0, 0)).save(img)
    assert main(["run", "attention", "--model", "vit-nystrom", "--weights", str(ckpt), "--images", str(img)]) == 0
    run = RunStore(store_root).list()[0]
    assert run.manifest["weights"]["source"] == "local"
    # a checkpoint of another kind is refused with the right model name
    assert main(["run", "attention", "--model", "vit-standard", "--weights", str(ckpt), "--images", str(img)]) == 2
    assert "load it as vit-nystrom" in capsys.readouterr().err


def test_broken_checkpoints_are_one_line_errors_naming_the_folder(store_root, tmp_path, capsys):
    import shutil

    from probe.weights import ZOO_DIR

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ZOO_DIR / "vit-standard", ckpt)
    good = (ckpt / "model.safetensors").read_bytes()
    cases = [
        (lambda: (ckpt / "model.safetensors").write_bytes(good[:3000]), "corrupt or truncated"),
        (lambda: (ckpt / "config.json").write_text("{bad json"), "is not valid JSON"),
        (lambda: (ckpt / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    ]
    for damage, what in cases:
        damage()
        assert main(["run", "attention", "--model", "vit-standard", "--weights", str(ckpt)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err and "ckpt" in err, err
    assert RunStore(store_root).list() == []


def test_an_unexpected_error_is_one_line_and_a_saved_traceback(monkeypatch, capsys):
    import probe.cli

    def boom(args):
        raise RuntimeError("something deep broke")

    monkeypatch.setattr(probe.cli, "cmd_models", boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: something deep broke" in err
    path = err.split("the traceback is in ")[1].split(";")[0]
    assert "Traceback" in open(path).read()


def test_bad_values_are_refused_before_any_work(store_root, capsys):
    for argv, flag in [(["run", "ablation", "--batch-size", "0"], "--batch-size"),
                       (["run", "ablation", "--k", "-4"], "--k"),
                       (["run", "flow", "--top-k", "-3"], "--top-k"),
                       (["run", "ca-params", "--text-tokens", "-5"], "--text-tokens"),
                       (["run", "attention", "--weights", ""], "--weights"),
                       (["run", "attention", "--shapes", "0"], "--shapes")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, (argv, err)
    assert RunStore(store_root).list() == []


@pytest.mark.parametrize(("argv", "says"), [
    (["run", "attention", "--weights", "meta"], "needs real weights"),
    (["run", "flow", "--max-new-tokens", "100000"], "generates 1 to"),
    (["run", "ca-params", "--model", ","], "names no model"),
    (["run", "attention", "--model", ""], "give a registered model name"),
    (["run", "attention", "--images", "x.png", "--shapes", "2"], "not both"),
    (["run", "attention", "--shapes", "100000"], "--shapes 100000"),
    (["run", "attention", "--out", ""], "empty: give a folder"),
    (["run", "attention", "--batch-size", "abc"], "invalid int value"),
    (["runs", "--show", "x", "--delete", "x"], "not allowed with argument"),
    (["run", "attention", "--model", "xattn-cond"], "does not offer"),
    (["run", "attention", "--model", "vit-performer", "--dtype", "float16"], "non-finite values"),
    (["run", "flow", "--model", "blip", "--weights", "probe/assets/zoo/git"], "holds a git checkpoint"),
    (["run", "attention", "--model", "hf-vit", "--weights", "probe/assets/zoo/blip"], "does not match the model"),
    (["run", "attention", "--images", ""], "image path is empty"),
])
def test_hostile_values_are_one_line_refusals(argv, says, store_root, capsys):
    """Cases a hostile tester found: each is refused in one line, before or instead of saving."""
    from pathlib import Path

    argv = [str(Path(__file__).parents[1] / a) if a.startswith("probe/assets") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert "RANDOM" not in err and not (store_root.exists() and RunStore(store_root).list())


def test_training_that_diverges_saves_nothing(tmp_path, capsys):
    data = tmp_path / "cifar"
    write_two_class_cifar(data)
    for lr in ("inf", "1e30"):
        out = tmp_path / f"ckpt{lr}"
        assert main(["train", "vit", "--data", str(data), "--out", str(out), "--lr", lr, "--epochs", "4",
                     "--batch-size", "16", "--dim", "16", "--depth", "1", "--image-size", "16"]) == 2
        err = capsys.readouterr().err
        assert ("positive finite" in err or "diverged" in err) and not out.exists(), err


def test_a_config_too_big_for_memory_is_refused_before_allocating():
    """Issue 17.6: a config with dim 65536 tried a 16+ GiB allocation; it is sized on the meta device first."""
    import time

    import probe
    from probe.types import ProbeError

    t = time.perf_counter()
    with pytest.raises(ProbeError, match="GiB for its weights alone"):
        probe.load_model("vit-standard", weights="random", config={"dim": 65536, "heads": 4})
    assert time.perf_counter() - t < 10


def test_no_untrained_checkpoint_is_saved(tmp_path, capsys):
    data = tmp_path / "cifar"
    write_two_class_cifar(data)
    for flag in (["--epochs", "0"], ["--max-steps", "0"]):
        out = tmp_path / "ckpt"
        assert main(["train", "vit", "--data", str(data), "--out", str(out), *flag]) == 2
        assert "must be >= 1" in capsys.readouterr().err and not out.exists()


def test_second_hostile_pass_cases(store_root, tmp_path, capsys):
    """Cases a second hostile pass found: each is one line, nothing saved or lost."""
    import shutil

    import probe
    from probe.capture import MaskTokens, ZeroHeads
    from probe.types import ProbeError
    from probe.weights import ZOO_DIR

    bad = [
        (["zoo", "train", "blip", "--steps", "2", "--threads", "100000"], "--threads 100000"),
        (["train", "vit", "--data", str(tmp_path), "--out", str(tmp_path / "c"), "--seed", "-1"], "--seed -1"),
        (["data", "shapes", "--n", "1", "--out", str(tmp_path / "d"), "--seed", str(2**70)], "--seed"),
        (["run", "ca-params", "--model", "blip", "--text-tokens", "40"], "text positions"),
        (["run", "rollout", "--discard-ratio", "nan"], "is NaN"),
        (["run", "ablation", "--baseline-seed", str(2**70)], "--baseline-seed"),
    ]
    for argv, says in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (argv, err)
    # a blip folder without its tokenizer is refused at load (it captioned '' before)
    folder = tmp_path / "blip-no-tok"
    shutil.copytree(ZOO_DIR / "blip", folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ProbeError, match="has no tokenizer"):
        probe.load_model("blip", weights=str(folder))
    vit = probe.load_model("vit-standard", weights="random", config={"image_size": 32, "patch_size": 8, "dim": 32})
    batch = vit.preprocess([Image.new("RGB", (32, 32))])
    for iv in (ZeroHeads("vision.blocks.0.attn.z", [1.5]), MaskTokens([1.5])):
        with pytest.raises(ValueError, match="whole numbers"), probe.intervene(vit, [iv]):
            vit.forward(batch)
    with pytest.raises(ProbeError, match="does not describe a valid model"):
        probe.load_model("vit-standard", weights="random", config={"heads": 0})
    with pytest.raises(ProbeError, match="come with their own config"):
        probe.load_model("vit-standard", weights="demo", config={"dim": 8})
    with pytest.raises(ValueError, match="decodes greedily"):
        probe.load_model("blip").generate_with_cache([Image.new("RGB", (8, 8))], num_beams=2)
    assert RunStore(store_root).list() == []
