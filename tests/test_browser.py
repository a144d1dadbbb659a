"""The app in a real browser: ``streamlit run app/main.py`` on a loopback port against a store made
here, Chromium headless driven over the DevTools protocol, the Runs page, a click through to the
Attention page, a screenshot, and assertions on the rendered DOM and on the screenshot's pixels.

CI (``.ci/run``) installs Debian's chromium and sets ``PROBE_BROWSER_TEST=1``: then a missing
chromium fails this test. Elsewhere, without chromium, it is skipped and says why.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probe.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "app"))
from probeapp.devtools import Chromium, chromium_binary, streamlit_server

REQUIRED = os.environ.get("PROBE_BROWSER_TEST", "") not in ("", "0")


def test_runs_page_then_attention_page_in_chromium(tmp_path):
    binary = chromium_binary()
    if binary is None:
        if REQUIRED:
            pytest.fail("PROBE_BROWSER_TEST=1 but no chromium on PATH: `apt-get install -y chromium` (see .ci/run)")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI sets PROBE_BROWSER_TEST=1 and runs this")
    store = tmp_path / "runs"
    assert main(["run", "attention", "--model", "vit-standard", "--weights", "demo", "--shapes", "2",
                 "--out", str(store)]) == 0
    (run_id,) = [p.name for p in store.iterdir()]
    shot_path = tmp_path / "attention_page.png"
    with streamlit_server(store, tmp_path / "streamlit.log") as url, \
            Chromium(binary, tmp_path / "chromium.log", width=1400, height=1000) as b:
        b.navigate(url)
        b.wait_for_text(["Runs", run_id, "vit-standard"], timeout=90)  # the rendered Runs page, not the shell
        assert "No runs" not in b.text()
        nav = b.evaluate("""[...document.querySelectorAll('[data-testid="stSidebarNav"] a')]
            .map(a => a.innerText.trim().split('\\n').pop().trim())""")
        assert {"Runs", "Compare", "Any run", "Attention", "Probes", "UMAP and modality gap", "Logit lens"} <= set(nav), nav
        assert "every network interface" not in b.text()  # started with --server.address 127.0.0.1
        b.click_nav("Attention")
        b.wait_for_text(["Query token", "attention of CLS, layer 0", run_id], timeout=60)
        boxes = b.wait_for("""(() => { const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')]
            .filter(i => i.complete && i.naturalWidth > 0);
            return imgs.length >= 2 ? imgs.length : 0; })()""", timeout=60)
        b.wait_for_text(["Query token"], timeout=30)  # idle again before the screenshot
        text = b.text()
        href = b.evaluate("location.href")
        images = b.images_loaded()
        box = b.image_box("attention of CLS, layer 0")  # the chosen layer's map
        png = b.screenshot()
    shot_path.write_bytes(png)
    if os.environ.get("PROBE_TEST_ARTIFACTS"):
        out = Path(os.environ["PROBE_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot_path, out / shot_path.name)

    # the DOM after navigation: the attention page of this run, no error
    assert "/attention" in href and f"run={run_id}" in href
    assert "Attention" in text and "vit-standard" in text and "Layer" in text and "Head" in text
    assert "every layer: CLS, mean (fused at capture)" in text
    assert "Traceback" not in text and "cannot be shown" not in text
    assert boxes >= 2 and images

    # the screenshot: a rendered page, and inside it the heat map over the image
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
    assert shot.shape[:2] == (1000, 1400)
    near_white = (shot.min(axis=-1) > 235).mean()
    assert 0.3 < near_white < 0.98, f"page looks blank or broken: {near_white:.2f} of it is white"
    assert box is not None and box["y"] + box["height"] <= 1000, box  # in the viewport, so in the screenshot
    x0, y0 = int(box["x"]), int(box["y"])
    crop = shot[y0: y0 + int(box["height"]), x0: x0 + int(box["width"])]
    assert crop.shape[0] > 150 and crop.shape[1] > 150, box
    colours = len(np.unique(crop.reshape(-1, 3).astype(np.uint8), axis=0))
    saturation = (crop.max(-1) - crop.min(-1)).mean()
    assert colours > 200, f"the map shows only {colours} colours: not a rendered heat map"
    assert crop.std() > 30 and saturation > 10, (crop.std(), saturation)
    assert (crop.min(axis=-1) > 235).mean() < 0.6, "the map region is mostly white"
