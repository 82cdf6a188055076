"""The inspector Space in a real browser (headless Chromium driven by Playwright), and its logic."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from conftest import ROOT, STORIES_MODEL, app_config, free_port, require_shared
from hf_lorsa import LorsaModel, collect
from hf_lorsa.analysis.inspector import Inspector, InspectorError, describe
from hf_lorsa.analysis.search import matching_tokens
from hf_lorsa.host import families

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
    # a token search ranks every head by that token's logit (the largest of its forms), above the head's mean logit
    first = inspector.head(0)
    token = first["suppressed_tokens"][0].replace("▁", " ").strip()  # head 0 lowers it: not among those found
    found = inspector.head_table(token=token.upper())
    forms = [i for i in range(len(stories_tokenizer)) if stories_tokenizer.decode([i]).strip().lower() == token.lower()]
    logits = families.direct_logits(inspector.model, inspector.lorsa.w_o)
    expected = (logits[:, forms] - logits.mean(-1, keepdim=True)).amax(-1)
    order = [h for h in expected.argsort(descending=True, stable=True).tolist() if expected[h] > 0]
    assert list(found["head"]) == order and 0 not in order and 0 < len(order) < 64
    assert found["logit of token"].tolist() == pytest.approx(expected[order].tolist(), abs=1e-3)
    with pytest.raises(InspectorError, match="No token of this model's vocabulary reads 'zzzzqqq'"):
        inspector.head_table(token="zzzzqqq")
    assert matching_tokens(["the", "there", "the", "a", ""], " The ") == [0, 2]  # whole tokens, any case or space
    # the browser gets one page at a time
    every = inspector.head_table(sort_by="head")
    with patch("hf_lorsa.analysis.inspector.PAGE_SIZE", 10):
        shown, caption, number = inspector.head_table_page(every, 2)
        assert list(shown["head"]) == list(range(10, 20)) and caption == "heads 11-20 of 64 (page 2 of 7)"
        shown, caption, number = inspector.head_table_page(every, 99)  # past the end: the last page
        assert list(shown["head"]) == list(range(60, 64)) and number == 7
    html = inspector.contexts_html(3)
    assert 'class="context"' in html and "outline" in html
    samples = inspector.samples_html(3)  # contexts from each range of |z| it reaches, labelled by range
    row = inspector.head(3)
    assert samples.count('class="context"') == len(row["samples"]) > 0
    assert [f"|z| from {label}" for label in dict.fromkeys(row["sample_ranges"])] == re.findall(
        r"<b>(\|z\| from [^<]+)</b>", samples
    )
    # the heatmap shows the head's z-pattern on its top context: each cell is A[q, s] * v[s]
    cells = re.findall(r"<td style='background:[^']*' title='(-?[0-9.]+)'>", inspector.pattern_html(3))
    ids = torch.tensor(inspector.head(3)["top_contexts"][0]["tokens"])[None]
    z = inspector.lorsa.z_pattern(collect(inspector.model, 2, input_ids=ids).hidden_states, 3)[0]
    expected = [f"{v:.3f}" for q in range(z.shape[0]) for v in z[q, : q + 1].tolist()]
    assert cells == expected
    assert len(inspector.logit_table(3)) == 20 and len(inspector.host_table(3)) == 8
    analysis = inspector.text("Once upon a time, there was a little dog.")
    assert len(analysis.tokens) == len(stories_tokenizer("Once upon a time, there was a little dog.").input_ids)
    assert analysis.active[0] == [] and all(len(a) == 8 for a in analysis.active[1:])  # BOS skipped, K=8 after
    head, _ = analysis.active[4][0]
    assert "z = " in inspector.text_pattern_html("Once upon a time, there was a little dog.", 4, head)
    # every head active at a token, with the sources it read: the largest contributions A[q, s] v[s] to its z
    at = inspector.position_heads("Once upon a time, there was a little dog.", 4)
    assert list(zip(at["head"], at["activation"])) == [(h, round(v, 4)) for h, v in analysis.active[4]]
    ids = stories_tokenizer("Once upon a time, there was a little dog.", return_tensors="pt").input_ids
    z = inspector.lorsa.z_pattern(collect(inspector.model, 2, input_ids=ids).hidden_states, head)[0, 4, :5]
    source = int(z.abs().argmax())
    assert at["read from (position token share)"][0].startswith(f"{source} ")
    assert f"({z[source].item() / z.sum().item():.0%})" in at["read from (position token share)"][0]
    long = inspector.text("word " * 1000)
    assert long.truncated and "truncated" in inspector.text_html(long)
    # heads found by what they do: a probe's score at least x, best first
    found = inspector.head_table(probe="previous_token", min_score=0.5, sort_by="previous_token")
    expected = {r["head"] for r in inspector.analysis if (r["probes"]["previous_token"] or 0) >= 0.5}
    assert set(found["head"]) == expected and list(found["previous_token"]) == sorted(found["previous_token"])[::-1]
    assert "host head 2 is a previous-token head (0.51)" in describe(inspector)  # the probes on the host's heads
    assert "probe scores: " in inspector.head_summary(3)
    # the head page's histogram counts every firing event once; its most alike heads are those of the analysis
    row = inspector.head(3)
    assert inspector.histogram_table(3)["activations"].sum() == row["events"] == sum(row["histogram"])
    unit = torch.nn.functional.normalize(inspector.lorsa.w_o.float(), dim=-1)
    cosine = unit @ unit[3]
    cosine[3] = -2
    alike = inspector.similar_table(3)
    by_direction = alike[alike["alike by"] == "output direction"]
    assert list(by_direction["head"]) == cosine.topk(5).indices.tolist()
    assert set(alike["alike by"]) == {"output direction", "fires together"}
    for bad in (lambda: inspector.head_table(probe="nope"), lambda: inspector.head_table(min_score="x"),
                lambda: inspector.head_table(sort_by="nope")):  # fmt: skip
        with pytest.raises(InspectorError):
            bad()
    for bad in (lambda: inspector.text("   "), lambda: inspector.head(64), lambda: inspector.head("x"),
                lambda: inspector.text_pattern_html("Once upon", 99, 0)):  # fmt: skip
        with pytest.raises(InspectorError):
            bad()


def test_a_saved_analysis_is_used(lorsa_dir, tmp_path, inspector):
    import shutil as sh

    from hf_lorsa.analysis.analysis import save_analysis

    folder = tmp_path / "with-analysis"
    sh.copytree(lorsa_dir, folder)
    save_analysis(inspector.analysis.select(range(64)), folder)
    loaded = Inspector.load(str(folder))
    assert loaded.notice == "" and loaded.analysis.to_list() == inspector.analysis.to_list()
    n_tokens = json.loads((folder / "analysis" / "meta.json").read_text())["n_tokens"]
    assert n_tokens > 0 and f"Analysis over {n_tokens} tokens." in describe(loaded)


def test_a_lorsa_and_model_that_do_not_belong_together(lorsa_dir, stories_model, stories_tokenizer):
    lorsa = LorsaModel.from_pretrained(lorsa_dir)
    lorsa.config.host_model_type = "gpt2"
    with pytest.raises(InspectorError, match="does not belong to this model"):
        Inspector(lorsa, stories_model, stories_tokenizer)
    lorsa = LorsaModel.from_pretrained(lorsa_dir)
    other = copy.deepcopy(stories_model)
    with torch.no_grad():
        other.model.layers[2].self_attn.q_proj.weight.mul_(1.5)  # the same shape, other weights
    with pytest.raises(InspectorError, match="does not belong") as refused:
        Inspector(lorsa, other, stories_tokenizer)
    # the advice in the Space's own terms: it takes the host as --model and always checks it
    assert "--model, or the variable LORSA_MODEL" in str(refused.value) and "strict=False" not in str(refused.value)


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


def test_space_in_a_real_browser(app_url, inspector):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app_url)
        expect(page.get_by_text("Lorsa for layer 2")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Analysis over ? tokens")).to_have_count(0)
        expect(page.locator("#analysis-notice")).to_contain_text("sampled from the model")
        table = page.locator("#head-table")
        rows = table.locator("[role=row]")
        expect(rows).not_to_have_count(0, timeout=30_000)
        expect(table).to_contain_text("frequency")
        expect(page.locator("#table-caption")).to_contain_text("heads 1-64 of 64 (page 1 of 1)")
        expect(page.locator("#inspector-header")).to_contain_text("host head 2 is a previous-token head")
        for probe in ("induction", "previous_token", "bos"):  # every probe's score is a column
            expect(table).to_contain_text(probe)
        page.screenshot(path=str(ARTIFACTS / "space-head-browser.png"), full_page=True)
        # find heads by what they do: only previous-token heads scoring at least 0.5 remain
        page.locator("#probe-filter input").click()
        page.get_by_role("option", name="previous_token").click()
        expected = sum((r["probes"]["previous_token"] or 0) >= 0.5 for r in inspector.analysis)  # the same analysis
        assert 0 < expected < 20
        expect(rows).to_have_count(expected + 1, timeout=30_000)  # and the header row
        page.screenshot(path=str(ARTIFACTS / "space-probe-filter.png"), full_page=True)
        page.locator("#probe-filter input").click()
        page.get_by_role("option", name="any").click()
        expect(rows).not_to_have_count(expected + 1, timeout=30_000)

        # clicking a row opens that head's page
        row = rows.nth(3)
        clicked_head = row.locator("[role=gridcell]").first.inner_text().strip()
        row.locator("[role=gridcell]").nth(2).click()
        expect(page.locator("#head-summary")).to_contain_text(f"Head {clicked_head} ", timeout=30_000)
        assert page.locator("#head-number input").input_value() == clicked_head
        expect(page.locator("#head-contexts .context").first).to_be_visible()

        page.locator("#head-number input").fill("5")
        page.locator("#show-head").click()
        expect(page.locator("#head-summary")).to_contain_text("Head 5", timeout=30_000)
        expect(page.locator("#head-contexts .context").first).to_be_visible()
        expect(page.locator("#head-samples .sample-range").first).to_contain_text("|z| from 1e")
        expect(page.locator("#head-samples .context").first).to_be_visible()
        heatmap = page.locator("#head-pattern .heatmap")
        expect(heatmap.locator("table")).to_be_visible()
        for plot in ("#head-logits", "#head-hosts", "#head-histogram"):  # bar charts drawn by the browser
            expect(page.locator(f"{plot} canvas, {plot} svg").first).to_be_visible(timeout=30_000)
        # the z-pattern heatmap of a long context stays inside its container, scrolling what does not fit
        box, outer = heatmap.bounding_box(), page.locator("#head-pattern").bounding_box()
        assert box["x"] >= outer["x"] and box["x"] + box["width"] <= outer["x"] + outer["width"] + 1
        scroll, client, overflow = heatmap.evaluate(
            "e => [e.scrollWidth, e.clientWidth, getComputedStyle(e).overflowX]"
        )
        assert scroll <= client or overflow in ("auto", "scroll")
        page.screenshot(path=str(ARTIFACTS / "space-head-page.png"), full_page=True)
        # a head alike opens with a click
        alike = page.locator("#head-similar [role=row]").nth(1)
        expect(alike).to_be_visible(timeout=30_000)
        other = alike.locator("[role=gridcell]").first.inner_text().strip()
        alike.locator("[role=gridcell]").nth(1).click()
        expect(page.locator("#head-summary")).to_contain_text(f"Head {other} ", timeout=30_000)

        # a user error says what is wrong and clears the stale page
        page.locator("#head-number input").fill("999")
        page.locator("#show-head").click()
        expect(page.get_by_text("Head 999 does not exist").first).to_be_visible(timeout=30_000)
        expect(page.locator("#head-summary")).not_to_contain_text("Head 5")
        expect(page.locator("#head-contexts .context")).to_have_count(0)

        page.get_by_role("tab", name="Your text").click()
        page.locator("#analyse-text").click()
        expect(page.get_by_text("Type some text first").first).to_be_visible(timeout=30_000)
        page.locator("#user-text textarea").fill("Once upon a time, there was a little girl named Lily.")
        page.locator("#text-head input").fill("3")
        page.locator("#analyse-text").click()
        tokens = page.locator("#text-tokens .token")
        expect(tokens).to_have_count(16, timeout=30_000)
        expect(page.locator("#text-active table.active")).to_contain_text("Lily")
        # tokens are shaded where the chosen head fires, and only there
        shading = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        shaded = [i for i, colour in enumerate(shading) if colour not in ("rgba(0, 0, 0, 0)", "transparent")]
        assert 0 < len(shaded) < len(shading)
        # clicking a token picks it and shows the head's z-pattern there
        tokens.nth(shaded[0]).click()
        expect(page.locator("#text-zpattern")).to_contain_text(f"Head 3 at token {shaded[0]} ", timeout=30_000)
        assert page.locator("#text-position input").input_value() == str(shaded[0])
        page.locator("#text-position input").fill("5")
        page.locator("#show-zpattern").click()
        expect(page.locator("#text-zpattern")).to_contain_text("Head 3 at token 5 ", timeout=30_000)
        # and every head active at that token, each with the sources it read; one opens with a click
        text = "Once upon a time, there was a little girl named Lily."
        at = inspector.position_heads(text, 5)
        heads_at = page.locator("#text-position-heads [role=row]")
        expect(heads_at).to_have_count(len(at) + 1, timeout=30_000)
        expect(page.locator("#text-position-heads")).to_contain_text(at["read from (position token share)"][0])
        page.screenshot(path=str(ARTIFACTS / "space-your-text.png"), full_page=True)
        heads_at.nth(1).locator("[role=gridcell]").nth(1).click()
        expect(page.locator("#head-summary")).to_contain_text(f"Head {at['head'][0]} ", timeout=30_000)
        page.get_by_role("tab", name="Head browser").click()
        # a token search: the heads that promote it, ranked by its logit
        word = inspector.head_table(sort_by="head").iloc[0]["promotes"].split()[0]
        page.locator("#token-filter textarea, #token-filter input").first.fill(word)
        page.locator("#token-filter textarea, #token-filter input").first.press("Enter")
        expect(page.locator("#table-caption")).to_contain_text(
            f"of {len(inspector.head_table(token=word))} (page 1", timeout=30_000
        )
        expect(table).to_contain_text("logit of token")
        browser.close()
    # the app is still serving after the errors, and logged no traceback for them
    assert urllib.request.urlopen(app_url, timeout=5).status == 200
    assert "Traceback" not in (ARTIFACTS / "space.log").read_text()


def test_concurrent_users_get_the_answers_of_one_user(app_url):
    """Ten clients asking at once for text, a head page and a z-pattern (30 requests) get exactly what one
    client alone gets: the shared host's hooks never see another request's forward pass."""
    from gradio_client import Client

    calls = [
        ("/analyse", ("Once upon a time, there was a little girl named Lily.", 3)),
        ("/head_page", (5,)),
        ("/z_pattern", ("Once upon a time, there was a little dog.", 6, 3)),
    ]
    alone = Client(app_url, verbose=False)
    expected = {name: str(alone.predict(*args, api_name=name)) for name, args in calls}
    clients = [Client(app_url, verbose=False) for _ in range(10)]
    jobs = [(name, client.submit(*args, api_name=name)) for client in clients for name, args in calls]
    answers = [(name, str(job.result(timeout=300))) for name, job in jobs]
    assert len(answers) == 30 and all(answer == expected[name] for name, answer in answers)


def test_a_port_in_use_is_refused_with_a_message(app_url, lorsa_dir):
    port = app_url.rstrip("/").rsplit(":", 1)[1]
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=port)
    app = ROOT / "spaces" / "lorsa-inspector" / "app.py"
    result = subprocess.run([sys.executable, str(app), "--lorsa", str(lorsa_dir)], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and f"Port {port} (GRADIO_SERVER_PORT) is in use" in result.stderr


def test_space_folder_installs_and_starts_in_a_fresh_virtualenv(tmp_path, lorsa_dir):
    """What a Space does: a new environment, `pip install -r requirements.txt` in the Space folder (the package
    registry and that folder only), then `python app.py` with LORSA_ID set."""
    space = tmp_path / "space"
    shutil.copytree(ROOT / "spaces" / "lorsa-inspector", space)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_space.py"), "--space", str(space)], check=True)
    assert [p.name for p in space.glob("*.whl")] == ["hf_lorsa-0.1.0-py3-none-any.whl"]
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # CPU torch first, as on this machine; no byte-compiling of the installed files, which only saves time
        [str(python), "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0"],
        [str(python), "-m", "pip", "install", "-q", "--no-compile", "-r", "requirements.txt", "-c",
         str(ROOT / ".ci" / "constraints.txt")],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, cwd=space, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            message = f"{' '.join(step)} failed: {done.stderr[-2000:]}"
            if os.environ.get("HF_LORSA_REQUIRE_SHARED"):
                pytest.fail(message)
            pytest.skip(f"needs the package registry: {message}")
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LORSA_ID": str(lorsa_dir), "HF_HUB_OFFLINE": "1",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen([str(python), "app.py"], cwd=space, env=env, stdout=log, stderr=log)
    try:
        page = app_config(port, app)
        assert "Lorsa for layer 2" in page, (tmp_path / "app.log").read_text()[-3000:]
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()
    # the app ran from the virtualenv's installed wheel, not from this checkout
    where = subprocess.run([str(python), "-c", "import hf_lorsa; print(hf_lorsa.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout  # fmt: skip
    assert str(venv) in where


def test_a_32768_head_analysis_pages_and_opens_a_head_within_a_second(inspector):
    """At the size researchers train (32,768 heads): the table goes to the browser a page at a time and a head's
    page opens in well under a second once the inspector is loaded (it reads one row of the table)."""
    import pyarrow as pa
    from datasets import Dataset

    n = 32_768
    table = inspector.analysis.data.table.take(pa.array([i % 64 for i in range(n)]))
    table = table.set_column(table.schema.get_field_index("head"), "head", pa.array(range(n), pa.int64()))
    analysis = Dataset(table, info=inspector.analysis.info)
    lorsa = LorsaModel.from_host(inspector.model, 2, n_ov_heads=n, top_k=8)
    big = Inspector(lorsa, inspector.model, inspector.tokenizer, analysis)
    start = time.perf_counter()
    shown, caption, _ = big.head_table_page(big.head_table(sort_by="head"), 300)
    assert time.perf_counter() - start < 1.0
    assert (
        list(shown["head"]) == list(range(29_900, 30_000)) and caption == "heads 29901-30000 of 32768 (page 300 of 328)"
    )
    for head in (0, 20_001, n - 1):
        start = time.perf_counter()
        views = (big.head_summary(head), big.contexts_html(head), big.samples_html(head), big.pattern_html(head),
                 big.logit_table(head), big.host_table(head), big.histogram_table(head), big.similar_table(head))  # fmt: skip
        assert time.perf_counter() - start < 1.0
        assert views[0].startswith(f"**Head {head}** ") and views[1] == inspector.contexts_html(head % 64)
    start = time.perf_counter()
    found = big.head_table(token=inspector.head(0)["promoted_tokens"][0].replace("▁", " "))
    assert time.perf_counter() - start < 3.0 and len(found) > 64  # every head searched, not the 64 analysed
