"""End to end in headless Chromium: the web explorer labels a prompt, appends a token chosen under an action,
and streams a generation. Debian's chromium, driven by Playwright; a screenshot goes to test-artifacts/."""

from pathlib import Path
from urllib.parse import urlparse

import pytest

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.serve import Limits, create_app
from test_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The token and fan-out views show the prompt now in the box (the page marks which prompt they show).
SHOWN = """() => {
    const prompt = document.querySelector('#prompt').value;
    return document.querySelector('#tokens').dataset.prompt === prompt
        && document.querySelector('#fanout').dataset.prompt === prompt;
}"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]


def test_explorer_page_end_to_end(tiny_model_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    model = BWAreaForCausalLM.from_pretrained(tiny_model_dir).eval()
    app = create_app(model, load_tokenizer(tiny_model_dir), Limits(max_tokens=32), model_id="tiny")
    ARTIFACTS.mkdir(exist_ok=True)
    requested = []
    with live_server(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda r: requested.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("#model:has-text('tiny')", timeout=15000)

            # Type a prompt: its tokens appear coloured by action, with the action number on hover.
            page.fill("#prompt", "The king said")  # fires "input", as typing does
            page.wait_for_function(SHOWN, timeout=15000)
            tokens = page.locator("#tokens .tok[data-action]")
            assert tokens.count() >= 3
            first = tokens.nth(1)
            action = first.get_attribute("data-action")
            assert f"action {action}" in first.get_attribute("title")
            assert first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
            first.hover()

            # The fan-out grid has a cell per action; clicking a next token under an action appends it.
            page.wait_for_selector(".cell[data-action='63']")
            assert page.locator(".cell").count() == 64
            before = page.input_value("#prompt")
            choice = page.locator(".cell .choice:not([data-text=''])").first  # one that writes some text
            appended = choice.get_attribute("data-text")
            choice.click()
            page.wait_for_function(SHOWN, timeout=15000)
            after = page.input_value("#prompt")
            assert after != before and after == before + appended
            assert page.get_attribute("#tokens", "data-prompt") == after

            # Generate: tokens stream in, each coloured by its action.
            page.fill("#max-tokens", "12")
            page.click("#generate")
            page.wait_for_selector("#output[data-state='done']", timeout=30000)
            assert page.text_content("#status").startswith("generated")
            generated = page.locator("#output .tok[data-action]")
            assert generated.count() >= 1
            assert all(generated.nth(i).get_attribute("title").startswith("action ")
                       for i in range(generated.count()))
            generated.nth(generated.count() // 2).hover()  # the screenshot shows a token's action tooltip
            page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requested if not u.startswith("data:")}
    assert hosts == {"127.0.0.1"}, f"the page fetched from other hosts: {hosts}"
    assert (ARTIFACTS / "explorer.png").stat().st_size > 10_000
