from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from probe.cli import main

APP = str(Path(__file__).parents[1] / "app" / "main.py")


def test_app_lists_runs_and_shows_one(store_root):
    assert main(["run", "attention", "--weights", "random"]) == 0
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.selectbox[0].options and at.selectbox[0].value.endswith(tuple("0123456789abcdef"))
    assert any("vit-standard" in m.value for m in at.metric)
    assert at.warning and "random weights" in at.warning[0].value
    assert len(at.get("image")) == 1
    assert "manifest_version" in at.code[0].value


def test_app_empty_store(store_root):
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert "No runs" in at.info[0].value


def test_app_shows_a_broken_run_as_broken(store_root):
    assert main(["run", "attention", "--weights", "random"]) == 0
    bad = store_root / "20990101-000000-attention-m-0a1b2c"  # a run id as probe makes them
    bad.mkdir()
    (bad / "manifest.json").write_text("[1, 2]")  # valid JSON, wrong shape
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    at.selectbox[0].set_value(bad.name).run()
    assert not at.exception and at.error and "broken" in at.error[0].value
