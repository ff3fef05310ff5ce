"""The web page in headless Chromium (Debian's, driven by Playwright; no browser download):
ask a question, see the streamed answer and its sources, upload a document and find it cited."""
from __future__ import annotations

import shutil

import pytest
from playwright import sync_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (scripts/test.sh installs it)")]

from test_serve import KEY, live  # noqa: E402,F401  (the live server fixture)

# Without the background-networking flags Chromium keeps dialling hosts this offline machine
# cannot reach; as root it needs --no-sandbox.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(live):  # noqa: F811
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _ask(page, question: str):
    before = page.locator(".answer[data-done=true]").count()
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.answer[data-done=true]').length > {before}")
    return page.locator(".answer").last


def test_page_asks_streams_cites_and_uploads(page, live, tmp_path):  # noqa: F811
    page.goto(live.url)
    page.wait_for_selector("#key-box:not([hidden])")  # the API wants the key: the page asks for it
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m'")
    assert page.is_checked("#rag")
    streamed = []
    page.expose_function("recordLength", lambda n: streamed.append(n))
    page.evaluate("""() => new MutationObserver(() => {
        const a = document.querySelectorAll('.answer-text'); if (a.length) recordLength(a[a.length - 1].textContent.length);
      }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
    # A grounded answer (extract-first) arrives whole, its span checked against its quote: the page
    # shows the answer, the quote and the cited file. (Token streaming is tested through the API.)
    answer = _ask(page, "How long should bread dough rise?")
    assert 'From [1]: "' in answer.locator(".answer-text").inner_text() and streamed
    assert "bread.rst" in answer.locator(".citation").first.inner_text()

    doc = tmp_path / "kettleton.md"
    doc.write_text("# Kettleton\n\nThe quillion bridge in Kettleton was painted green in 1921 by the guild of rope makers.\n")
    page.set_input_files("#file", str(doc))
    page.click("#upload")
    page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('added')")
    answer = _ask(page, "What colour was the quillion bridge painted?")
    assert "kettleton.md" in answer.locator(".citation").first.inner_text()
