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


OWNER_POLICY = """\
tiers:
  pro: {quota: 2/day, on_exhausted: {downgrade: free}}
brownout: {signal: queue_depth, above: 50, below: 5, serve: {pro: free}}
"""


@pytest.fixture(scope="module")
def owner_site(tmp_path_factory):
    """A server with a quota policy and a brownout rule, after 3 requests from one pro key (the
    third is served at free once the quota of 2 is used up)."""
    import httpx

    tmp = tmp_path_factory.mktemp("owner")
    store = KeyStore(tmp / "keys.sqlite")
    policy = tmp / "policy.yaml"
    policy.write_text(OWNER_POLICY)
    app = create_app(
        torchvision_artifact(tmp / "artifact"),
        keys=store,
        config=ServeConfig(rate_limits={}),
        policy=policy,
    )
    _, pro = store.create("pro", name="alice")
    _, owner = store.create(None, owner=True, name="boss")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        tiers = []
        for seed in range(3):
            answer = client.post(
                "/v1/classify",
                headers={"X-API-Key": pro},
                files={"image": ("x.png", random_png(seed), "image/png")},
            )
            assert answer.status_code == 200, answer.text
            tiers.append(answer.headers["X-Tier"])
        assert tiers == ["pro", "pro", "free"]
        yield url, store, {"pro": pro, "owner": owner}


def _open_owner_page(browser, url: str, key: str):
    page = browser.new_page()
    page.goto(f"{url}/owner")
    page.fill("#owner-key", key)
    page.click("#use-key")
    return page


def test_owner_page_shows_traffic_downgrades_brownout_policy_and_keys(
    owner_site, browser, tmp_path
):
    url, _, keys = owner_site
    page = _open_owner_page(browser, url, keys["owner"])
    page.wait_for_selector("#dashboard:not([hidden])")
    assert page.locator("#error").is_hidden()
    assert keys["owner"] not in page.url
    assert page.evaluate("localStorage.length") == 0

    # the chart: one series of requests served per tier, the downgrade into free drawn dashed
    assert page.locator("#chart svg").count() == 1
    assert page.locator('#chart svg path.series.requests[data-tier="pro"]').count() == 1
    assert page.locator('#chart svg path.series.requests[data-tier="free"]').count() == 1
    downgrade = page.locator('#chart svg path.series.downgrades[data-tier="free"]')
    assert downgrade.count() == 1
    assert downgrade.get_attribute("stroke-dasharray") != "none"
    assert page.locator('#chart svg path.series.downgrades[data-tier="pro"]').count() == 0
    assert "time (UTC" in page.text_content("#chart svg")
    assert page.locator("#legend .item").count() == 3
    assert page.text_content("#downgrades") == "1"
    assert page.text_content('#totals tr[data-tier="pro"] td:nth-child(2)') == "2"
    assert page.text_content('#totals tr[data-tier="free"] td:nth-child(2)') == "1"

    # the brownout state and the load signals
    assert page.text_content("#brownout-state") == "off"
    assert page.text_content("#brownout-above") == "50"
    assert page.text_content("#brownout-below") == "5"
    assert "queue_depth" in page.text_content("#brownout")
    assert "queue depth" in page.text_content("#load")
    assert page.text_content("#schedules") == "none"

    # the policy in force
    assert page.text_content("#policy-source").endswith("policy.yaml")
    pro_rule = page.locator('#policy-tiers tr[data-name="pro"] td').all_text_contents()
    assert pro_rule == ["pro", "no limit", "2/day", "serve free"]
    assert "above 50" in page.text_content("#policy-brownout")

    # the keys: stubs only, the pro key's use per served tier
    rows = page.locator("#keys tbody tr")
    assert rows.count() == 2
    stubs = page.eval_on_selector_all("#keys tbody tr", "rows => rows.map(r => r.dataset.stub)")
    assert all(stub.startswith("nnobf_") and stub.endswith("…") for stub in stubs)
    body = page.text_content("#keys")
    assert keys["pro"] not in body and keys["owner"] not in body
    alice = page.locator("#keys tbody tr", has_text="alice")
    assert alice.locator('td[data-tier="pro"]').text_content() == "2"
    assert alice.locator('td[data-tier="free"]').text_content() == "1"

    # the key is kept for this tab only and refreshes happen on their own
    assert page.evaluate("sessionStorage.getItem('nnobf-owner-key')") == keys["owner"]
    first = page.text_content("#updated")
    page.wait_for_function(
        f"document.getElementById('updated').textContent !== {first!r}", timeout=15000
    )
    page.select_option("#range", "60")
    page.wait_for_function("document.querySelectorAll('#chart svg path.series').length === 3")
    page.screenshot(path=str(tmp_path / "owner.png"), full_page=True)
    page.close()


def test_owner_page_refuses_a_non_owner_key(owner_site, browser):
    url, _, keys = owner_site
    page = _open_owner_page(browser, url, keys["pro"])
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error")
    assert message.startswith("403")
    assert "this page needs an owner key: nnobf keys create --owner" in message
    assert page.locator("#dashboard").is_hidden()
    assert page.evaluate("sessionStorage.getItem('nnobf-owner-key')") is None
    page.fill("#owner-key", "nnobf_wrong_key")
    page.click("#use-key")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('401')")
    assert "nnobf keys create --owner" in page.text_content("#error")
    page.close()


def test_pages_link_to_each_other(site, browser):
    url, _, _ = site
    page = browser.new_page()
    page.goto(url)
    page.click("footer a[href='/owner']")
    page.wait_for_selector("#owner-key")
    page.click("footer a[href='/']")
    page.wait_for_selector("#key")
    page.close()


@pytest.fixture(scope="module")
def text_site(tmp_path_factory):
    """A tiny text-generation model (tiers of a random Llama, a word-level tokenizer)."""
    from tiny_chat import tiered_lm, tiny_tokenizer

    store = KeyStore(tmp_path_factory.mktemp("text") / "keys.sqlite")
    config = ServeConfig(rate_limits={}, max_tokens=8, default_max_tokens=8)
    tiered, tokenizer = tiered_lm(), tiny_tokenizer()
    app = create_app(tiered, keys=store, config=config, tokenizer=tokenizer)
    with serve_in_thread(app) as url:
        yield url, store, tiered, tokenizer


def test_page_streams_a_text_answer_into_its_prompt_box(text_site, browser):
    from tiny_chat import chat_ids, reference

    url, store, tiered, tokenizer = text_site
    ids = chat_ids(tokenizer, [{"role": "user", "content": "w5 w6"}])
    text, _ = reference(tiered, tokenizer, ids, "pro")
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('model-info').textContent.includes('text')")
    assert page.locator("#prompt").is_visible() and page.locator("#file").is_hidden()
    assert page.text_content("#run") == "Send" and page.locator("#compare").is_hidden()
    page.fill("#key", store.create("pro")[1])
    page.click("#use-key")
    page.wait_for_function("document.getElementById('key-status').textContent.includes('pro')")
    page.fill("#prompt", "w5 w6")
    page.click("#run")
    page.wait_for_selector("#result .answer[data-done]")  # the stream reached [DONE]
    assert page.text_content("#result .answer") == text
    assert page.text_content("#result-tier") == "pro" and page.locator("#error").is_hidden()
    page.close()
