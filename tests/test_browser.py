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



def rgb(css: str) -> tuple[int, int, int]:
    """'rgb(12, 34, 56)' -> (12, 34, 56)."""
    return tuple(int(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3])


def linear(c: tuple[int, int, int]) -> list[float]:
    return [(v / 255 / 12.92) if v / 255 <= 0.04045 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG contrast ratio of two sRGB colours."""
    def luminance(c):
        r, g, b = linear(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def delta_e(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """CIE76 colour difference of two sRGB colours (about 2.3: just noticeable; over 10: clearly different)."""
    def lab(c):
        r, g, b = linear(c)
        f = [t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116 for t in (
            (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b,
            (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)]
        return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return sum((x - y) ** 2 for x, y in zip(lab(a), lab(b))) ** 0.5


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]


def test_explorer_page_end_to_end(tiny_model_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    model = BWAreaForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.set_action_sampling(greedy=False, temp=0.7)  # the page starts from the model's action temperature
    app = create_app(model, load_tokenizer(tiny_model_dir), Limits(max_tokens=32), model_id="tiny")
    ARTIFACTS.mkdir(exist_ok=True)
    requested = []
    with live_server(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda r: requested.append(r.url))
            failed = []
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("#model:has-text('tiny')", timeout=15000)
            assert page.input_value("#action-temperature") == "0.7"

            # Type a prompt: its tokens appear coloured by action, with the action number on hover.
            page.fill("#prompt", "The king said")  # fires "input", as typing does
            page.wait_for_function(SHOWN, timeout=15000)
            tokens = page.locator("#tokens .tok[data-action]")
            assert tokens.count() >= 3
            first = tokens.nth(1)
            action = first.get_attribute("data-action")
            assert f"action {action}" in first.get_attribute("title")
            assert first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
            # the action's number is shown after the token (drawn by CSS, so copied text stays the text)
            assert first.evaluate("e => getComputedStyle(e, '::after').content") == f'"{action}"'
            first.hover()

            # The fan-out grid has a cell per action; clicking a next token under an action appends it.
            page.wait_for_selector(".cell[data-action='63']")
            assert page.locator(".cell").count() == 64
            # Every action has its own colour, and its number is legible on it (WCAG AA: contrast >= 4.5).
            badges = page.eval_on_selector_all(".cell .badge", """els => els.map(e => [Number(e.textContent),
                getComputedStyle(e).backgroundColor, getComputedStyle(e).color])""")
            assert sorted(a for a, _, _ in badges) == list(range(64))
            backgrounds = {a: rgb(bg) for a, bg, _ in badges}
            assert len(set(backgrounds.values())) == 64
            closest = min(delta_e(backgrounds[a], backgrounds[b]) for a in range(64) for b in range(a))
            assert closest >= 15, f"two actions' colours are only {closest:.1f} Delta-E apart"
            assert min(contrast(rgb(bg), rgb(fg)) for _, bg, fg in badges) >= 4.5
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
            assert not failed, failed  # no 404s: not even /favicon.ico
        finally:
            browser.close()
    hosts = {urlparse(u).hostname for u in requested if not u.startswith("data:")}
    assert hosts == {"127.0.0.1"}, f"the page fetched from other hosts: {hosts}"
    assert (ARTIFACTS / "explorer.png").stat().st_size > 10_000


def test_explorer_shows_a_searched_sequence_beside_the_greedy_one(tiny_model_dir):
    sync_api = pytest.importorskip("playwright.sync_api")

    def letter_e(prompts, completions, **kwargs):  # a reward the greedy completion is unlikely to maximise
        return [float(c.count("e")) for c in completions]

    model = BWAreaForCausalLM.from_pretrained(tiny_model_dir).eval()
    app = create_app(model, load_tokenizer(tiny_model_dir), Limits(max_tokens=32, max_search_budget=400),
                     model_id="tiny", search_rewards={"letter_e": letter_e})
    ARTIFACTS.mkdir(exist_ok=True)
    with live_server(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("#search-reward option[value='letter_e']", state="attached", timeout=15000)
            assert page.get_attribute("#search-budget", "max") == "400"
            page.fill("#prompt", "The king said")
            page.fill("#search-tokens", "8")
            page.fill("#search-budget", "300")
            page.select_option("#search-method", "mcts")
            page.click("#search")
            page.wait_for_selector("#search-result[data-state='done'], #search-result[data-state='error']",
                                   timeout=30000)
            assert page.get_attribute("#search-result", "data-state") == "done", page.text_content("#status")
            # Both completions are there, each token coloured by its action, after the (uncoloured) prompt.
            for box in ("#greedy-output", "#search-output"):
                tokens = page.locator(f"{box} .tok[data-action]")
                assert 1 <= tokens.count() <= 8
                assert tokens.first.get_attribute("title").startswith("action ")
                assert tokens.first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
            assert page.text_content("#search-label") == "search (mcts)"
            greedy = float(page.text_content("#greedy-reward").split()[-1])
            searched = float(page.text_content("#search-reward-value").split()[-1])
            assert searched >= greedy  # a search never returns less than the greedy sequence
            assert "world-model token evaluations" in page.text_content("#search-stats")
            page.screenshot(path=str(ARTIFACTS / "explorer-search.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
