"""The inspector Space in a real browser (headless Chromium driven by Playwright), and its logic."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, STORIES_MODEL, require_shared
from hf_lorsa import LorsaModel
from hf_lorsa.inspector import Inspector, InspectorError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def lorsa_dir(tmp_path_factory, stories_model):
    require_shared()
    path = tmp_path_factory.mktemp("lorsa")
    lorsa = LorsaModel.from_host(stories_model, 2, n_ov_heads=64, top_k=8)
    lorsa.config.skip_token_ids = [1]
    lorsa.config.base_model_name_or_path = str(STORIES_MODEL)
    lorsa.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def inspector(lorsa_dir):
    return Inspector.load(str(lorsa_dir))


def test_inspector_views_and_errors(inspector, stories_tokenizer):
    assert "sampled from the model" in inspector.notice  # no precomputed analysis: says so
    table = inspector.head_table()
    assert len(table) == 64 and list(table["frequency"]) == sorted(table["frequency"], reverse=True)
    assert set(inspector.head_table(sort_by="head")["head"]) == set(range(64))
    first = inspector.head_table(sort_by="head").iloc[0]
    token = first["promotes"].split()[0]
    assert first["head"] in set(inspector.head_table(token=token)["head"])
    assert inspector.head_table(token="zzzzqqq").empty
    html = inspector.contexts_html(3)
    assert 'class="context"' in html and "outline" in html
    assert "<table>" in inspector.pattern_html(3)
    assert len(inspector.logit_table(3)) == 20 and len(inspector.host_table(3)) == 8
    analysis = inspector.text("Once upon a time, there was a little dog.")
    assert len(analysis.tokens) == len(stories_tokenizer("Once upon a time, there was a little dog.").input_ids)
    assert analysis.active[0] == [] and all(len(a) == 8 for a in analysis.active[1:])  # BOS skipped, K=8 after
    head, _ = analysis.active[4][0]
    assert "z = " in inspector.text_pattern_html("Once upon a time, there was a little dog.", 4, head)
    long = inspector.text("word " * 1000)
    assert long.truncated and "truncated" in inspector.text_html(long)
    for bad in (lambda: inspector.text("   "), lambda: inspector.head(64), lambda: inspector.head("x"),
                lambda: inspector.text_pattern_html("Once upon", 99, 0)):  # fmt: skip
        with pytest.raises(InspectorError):
            bad()


def test_a_saved_analysis_is_used(lorsa_dir, tmp_path, inspector):
    import shutil as sh

    from hf_lorsa.analysis import save_analysis

    folder = tmp_path / "with-analysis"
    sh.copytree(lorsa_dir, folder)
    save_analysis(inspector.analysis.select(range(64)), folder)
    loaded = Inspector.load(str(folder))
    assert loaded.notice == "" and loaded.analysis.to_list() == inspector.analysis.to_list()


def test_a_lorsa_and_model_that_do_not_belong_together(lorsa_dir, stories_model, stories_tokenizer):
    lorsa = LorsaModel.from_pretrained(lorsa_dir)
    lorsa.config.host_model_type = "gpt2"
    with pytest.raises(InspectorError, match="does not belong to this model"):
        Inspector(lorsa, stories_model, stories_tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(lorsa_dir):
    if not Path(CHROMIUM).exists():
        if os.environ.get("HF_LORSA_REQUIRE_SHARED"):
            pytest.fail("Chromium is missing: install it with `apt-get install chromium` (.ci/setup does).")
        pytest.skip("needs Chromium at /usr/bin/chromium")
    port = free_port()
    env = dict(
        os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False"
    )
    app = ROOT / "spaces" / "lorsa-inspector" / "app.py"
    log = open(ARTIFACTS.mkdir(exist_ok=True) or ARTIFACTS / "space.log", "w")
    process = subprocess.Popen([sys.executable, str(app), "--lorsa", str(lorsa_dir)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"the app exited; see {ARTIFACTS / 'space.log'}")
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the app did not start in time")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_space_in_a_real_browser(app_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app_url)
        expect(page.get_by_text("Lorsa for layer 2")).to_be_visible(timeout=60_000)
        expect(page.locator("#analysis-notice")).to_contain_text("sampled from the model")
        table = page.locator("#head-table")
        expect(table.get_by_role("row")).not_to_have_count(0, timeout=30_000)
        expect(table).to_contain_text("frequency")
        page.screenshot(path=str(ARTIFACTS / "space-head-browser.png"), full_page=True)

        page.get_by_role("tab", name="Head", exact=True).click()
        page.locator("#head-number input").fill("5")
        page.locator("#show-head").click()
        expect(page.locator("#head-summary")).to_contain_text("Head 5", timeout=30_000)
        expect(page.locator("#head-contexts .context").first).to_be_visible()
        expect(page.locator("#head-pattern table")).to_be_visible()
        for plot in ("#head-logits", "#head-hosts"):  # bar charts drawn by the browser
            expect(page.locator(f"{plot} canvas, {plot} svg").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "space-head-page.png"), full_page=True)

        page.locator("#head-number input").fill("999")
        page.locator("#show-head").click()
        expect(page.get_by_text("Head 999 does not exist").first).to_be_visible(timeout=30_000)

        page.get_by_role("tab", name="Your text").click()
        page.locator("#analyse-text").click()
        expect(page.get_by_text("Type some text first").first).to_be_visible(timeout=30_000)
        page.locator("#user-text textarea").fill("Once upon a time, there was a little girl named Lily.")
        page.locator("#analyse-text").click()
        expect(page.locator("#text-tokens .tok").first).to_be_visible(timeout=30_000)
        expect(page.locator("#text-tokens table.active")).to_contain_text("Lily")
        page.locator("#text-position input").fill("5")
        page.locator("#text-head input").fill("3")
        page.locator("#show-zpattern").click()
        expect(page.locator("#text-zpattern")).to_contain_text("z = ", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "space-your-text.png"), full_page=True)
        browser.close()
    # the app is still serving after the errors
    assert urllib.request.urlopen(app_url, timeout=5).status == 200
