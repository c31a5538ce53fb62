"""The web page at `/` in headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nnobfuscator.serving import KeyStore, ServeConfig, create_app
from nnobfuscator.serving.testing import random_png, serve_in_thread, torchvision_artifact

CHROMIUM = os.environ.get("NNOBF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"Chromium is absent ({CHROMIUM}): `apt-get install chromium` (make test tries) "
    "or set NNOBF_CHROMIUM to a Chromium binary to test the web page",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    store = KeyStore(tmp / "keys.sqlite")
    app = create_app(
        torchvision_artifact(tmp / "artifact"), keys=store, config=ServeConfig(rate_limits={})
    )
    with serve_in_thread(app) as url:
        yield url, store, app


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _upload(page, png: bytes) -> None:
    page.set_input_files("#file", files=[{"name": "x.png", "mimeType": "image/png", "buffer": png}])


def test_page_classifies_with_the_key_tier(site, browser, tmp_path):
    url, store, app = site
    _, key = store.create("pro", name="web-user")
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('resnet18')")
    assert page.locator("#run").is_disabled()
    page.fill("#key", "nnobf_wrong_key")
    page.click("#use-key")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.text_content("#error")
    page.fill("#key", key)
    page.click("#use-key")
    page.wait_for_function("document.getElementById('key-status').textContent.includes('tier pro')")
    assert page.locator("#compare").is_hidden()
    _upload(page, random_png(11))
    page.click("#run")
    page.wait_for_selector("#result-card:not([hidden])")
    assert page.text_content("#result-tier") == "pro"
    assert page.text_content("#result .label").startswith("class")
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    page.close()


def test_owner_key_compares_all_tiers_side_by_side(site, browser, tmp_path):
    url, store, _ = site
    _, key = store.create(None, owner=True, name="web-owner")
    page = browser.new_page()
    page.goto(url)
    page.fill("#key", key)
    page.click("#use-key")
    page.wait_for_function("document.getElementById('key-status').textContent.includes('owner')")
    _upload(page, random_png(12))
    page.click("#compare")
    page.wait_for_selector("#compare-card:not([hidden])")
    tiers = page.eval_on_selector_all(".tier-result", "cards => cards.map(c => c.dataset.tier)")
    assert tiers == ["free", "pro", "premium"]
    assert page.locator(".tier-result .label").count() == 3
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    if os.environ.get("NNOBF_SCREENSHOTS"):
        page.screenshot(path=os.environ["NNOBF_SCREENSHOTS"], full_page=True)
    page.close()
