"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright) on a real
gateway (llama.cpp, real GGUF LoRA versions) with live traffic from the `openai` client.

Every page must render with no console error, no failed request and nothing loaded from elsewhere;
the rollout page must match `loragate rollout status --json` and follow new traffic without a
reload; a user key sees no action and its forged POST is refused; the gate's refusal shows its
reasons. The screenshots in the README come from here: LORAGATE_CONSOLE_SCREENSHOTS=docs/console.

Without chromium or playwright this module skips, unless LORAGATE_TEST_REQUIRE_BROWSER=1 (as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from loragate.gateway.keys import KeyStore
from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import BASE_ID, HUB_ID, gguf_lora, peft_adapter, run_cli
from .gateway_server import GatewayServer
from .test_console import scored_versions

pytestmark = pytest.mark.model
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:
    sync_playwright = None
if CHROMIUM is None or sync_playwright is None:
    if os.environ.get("LORAGATE_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium and playwright are required (LORAGATE_TEST_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip("needs Debian's chromium package and playwright", allow_module_level=True)
pytest.importorskip("xllamacpp")

CHAT = [{"role": "user", "content": "Where is my order?"}]


class Stack:
    def __init__(self, home: Path, gateway: GatewayServer, admin: str, user: str):
        self.home, self.gateway, self.admin, self.user = home, gateway, admin, user
        self.client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=admin, max_retries=0)

    def traffic(self, requests: int, first_user: int) -> None:
        """``requests`` chat requests from as many users, four at a time."""
        def ask(n: int) -> None:
            self.client.chat.completions.create(model="support", messages=CHAT, max_tokens=4, temperature=0,
                                                user=f"user-{n}")

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(ask, range(first_user, first_user + requests)))

    def rollout_status(self) -> dict:
        return json.loads(run_cli(self.home, "rollout", "status", "support", "--json").stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hf_base) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("console") / "home"
    registry = Registry(Settings(home=home, user="tester"))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    scratch = tmp_path_factory.mktemp("adapters")
    scored_versions(registry, lambda n: peft_adapter(hf_base, scratch / f"a{n}", ["q_proj", "v_proj"], seed=n),
                    then=lambda version: gguf_lora(registry, version.ref))
    keys = KeyStore(registry)
    admin, user = keys.create("ops", scope="admin").token, keys.create("viewer").token
    with GatewayServer(home, LORAGATE_GATEWAY__METER_FLUSH_INTERVAL_S="0.3",
                       LORAGATE_GATEWAY__CONSOLE_REFRESH_S="0.5") as gateway:
        yield Stack(home, gateway, admin, user)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions, failed requests and foreign URLs are kept."""

    def __init__(self, browser: Browser, origin: str, secrets: list[str]):
        self.context = browser.new_context(viewport={"width": 1360, "height": 900})
        self.page: Page = self.context.new_page()
        self.origin, self.secrets, self.problems, self.urls = origin, secrets, [], []
        self.refusals: set[str] = set()  # URLs of actions the test expects refused: Chromium logs their 4xx
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("request", lambda r: self.urls.append(r.url))

    def _failed(self, request) -> None:
        # Leaving a page cancels what it still loads (the rollout page's refresh, the icon): not a
        # failure. A server's error status is logged to the console as an error, and counted there.
        if "ERR_ABORTED" not in (request.failure or ""):
            self.problems.append(f"failed: {request.url} {request.failure}")

    def _console(self, message) -> None:
        if message.type == "error" and message.location.get("url") not in self.refusals:
            self.problems.append(f"console: {message.text} at {message.location}")

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.origin}/ui")
        self.page.fill('input[name="key"]', key)
        self.page.click('button[type="submit"]')
        self.page.wait_for_url(f"{self.origin}/ui")

    def visit(self, path: str, charts: int = 0) -> Page:
        response = self.page.goto(f"{self.origin}{path}")
        assert response is not None and response.status == 200, (path, response and response.status)
        if charts:  # plotly has drawn every chart on the page
            self.page.wait_for_function(f"document.querySelectorAll('.chart .main-svg').length >= {charts}")
        return self.page

    def check(self) -> None:
        assert self.problems == []
        assert all(url.startswith(self.origin) or url.startswith("data:") for url in self.urls), self.urls
        assert not any(secret in url for url in self.urls for secret in self.secrets)
        assert not any(secret in self.page.content() for secret in self.secrets)


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("LORAGATE_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _arm_cells(page: Page) -> dict[str, dict[str, str]]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('tr[data-arm]')].map(row =>
        [row.dataset.arm, Object.fromEntries([...row.querySelectorAll('[data-field]')].map(c =>
            [c.dataset.field, c.textContent.trim()]))]))""")


def _charted_requests(page: Page) -> int:
    """Requests the 'requests per bucket' chart shows, all arms together."""
    return page.evaluate("""() => document.querySelector('.chart[data-series="requests"]').data
        .reduce((sum, trace) => sum + trace.y.reduce((a, b) => a + (b || 0), 0), 0)""")


def test_an_admin_watches_a_rollout_live_and_acts(stack, browser, screenshots):
    admin = Watched(browser, stack.gateway.url, [stack.admin, stack.user])
    admin.sign_in(stack.admin)
    admin.visit("/ui")
    admin.page.screenshot(path=screenshots / "adapters.png", full_page=True)
    version = admin.visit("/ui/adapters/support/versions/2", charts=2)  # loss curve, eval suites
    assert "support@2 → support@1 → SmolLM2-135M-Instruct" in version.inner_text('[data-testid="lineage"]')
    version.screenshot(path=screenshots / "version.png", full_page=True)
    admin.visit("/ui/adapters/support/aliases", charts=1)

    # Start a rollout from the adapter page's form: half the users to support@2, no verdict before 10k requests.
    adapter = admin.visit("/ui/adapters/support", charts=1)
    adapter.select_option('form[data-action="start-rollout"] select[name="candidate"]', "2")
    adapter.fill('form[data-action="start-rollout"] input[name="weight"]', "50")
    adapter.fill('form[data-action="start-rollout"] input[name="min_requests"]', "10000")
    adapter.click('form[data-action="start-rollout"] button')
    assert adapter.inner_text('[data-testid="outcome"]') == "done"
    assert stack.rollout_status()["weight"] == 50

    stack.traffic(24, first_user=0)
    rollout = admin.visit("/ui/adapters/support/rollout", charts=6)
    # The page refreshes itself: wait until it shows all 24, then compare with the CLI's JSON.
    rollout.wait_for_function("""() => [...document.querySelectorAll('tr[data-arm] [data-field="requests"]')]
        .reduce((sum, cell) => sum + Number(cell.textContent), 0) === 24""", timeout=30_000)
    cli = {arm["arm"]: arm for arm in stack.rollout_status()["arms"]}
    shown = _arm_cells(rollout)
    assert set(shown) == {"production", "candidate"} and all(cli[arm]["requests"] > 0 for arm in cli)
    for arm, cells in shown.items():
        expected = cli[arm]
        assert int(cells["requests"]) == expected["requests"] and int(cells["version"]) == expected["version"]
        assert cells["error_rate"] == f"{expected['error_rate'] * 100:.1f}%"
        for field in ("p50_ms", "p95_ms", "ttft_p50_ms"):
            assert abs(float(cells[field]) - expected[field]) <= 0.51, (arm, field, cells[field], expected[field])
        assert abs(float(cells["cost_per_1k_usd"]) - expected["cost_per_1k_usd"]) <= 0.00005
    assert _charted_requests(rollout) == 24
    rollout.screenshot(path=screenshots / "rollout.png", full_page=True)

    stack.traffic(12, first_user=100)  # no reload: the table and the charts follow
    rollout.wait_for_function("""() => [...document.querySelectorAll('tr[data-arm] [data-field="requests"]')]
        .reduce((sum, cell) => sum + Number(cell.textContent), 0) === 36""", timeout=30_000)
    rollout.wait_for_function("""() => document.querySelector('.chart[data-series="requests"]').data
        .reduce((sum, trace) => sum + trace.y.reduce((a, b) => a + (b || 0), 0), 0) === 36""", timeout=10_000)
    error_chart = rollout.evaluate("document.querySelector('.chart[data-threshold=\"error\"]').layout.shapes[0].y0")
    assert error_chart == pytest.approx(0.05)  # the automatic rollback's threshold, drawn

    # The gate's verdict before promoting, and its reasons after the refusal.
    refused = admin.visit("/ui/adapters/support/versions/3", charts=2)
    assert "refuses" in refused.inner_text('[data-testid="gate"]')
    admin.refusals.add(f"{stack.gateway.url}/ui/adapters/support/promote")
    refused.click('form[data-action="promote"] button')
    reasons = refused.inner_text('[data-testid="reasons"]')
    assert "does not beat the base model's 0.3" in reasons and "worse than production support@1's 0.7" in reasons
    refused.screenshot(path=screenshots / "refused.png", full_page=True)
    assert Registry(Settings(home=stack.home)).get("support@production").version == 1

    cost = admin.visit("/ui/cost?since=1h&by=arm", charts=1)
    assert "support:candidate" in cost.inner_text('[data-testid="cost"]')
    cost.screenshot(path=screenshots / "cost.png", full_page=True)
    admin.check()

    # A user key reads the same pages, sees no action, and a POST it forges is refused.
    user = Watched(browser, stack.gateway.url, [stack.admin, stack.user])
    user.sign_in(stack.user)
    page = user.visit("/ui/adapters/support/rollout", charts=6)
    assert page.locator("form.action").count() == 0 and "viewer (user key)" in page.inner_text('[data-testid="who"]')
    assert user.visit("/ui/adapters/support/versions/3").locator("form.action").count() == 0
    forged = page.request.post(f"{stack.gateway.url}/ui/adapters/support/rollout/abort", form={"reason": "x"})
    assert forged.status == 403 and stack.rollout_status()["status"] == "active"
    user.check()

    # The admin ends the rollout from its page; the page shows it ended.
    page = admin.visit("/ui/adapters/support/rollout")
    page.fill('form[data-action="abort"] input[name="reason"]', "browser test done")
    page.click('form[data-action="abort"] button')
    assert page.inner_text('[data-testid="outcome"]') == "done"
    assert stack.rollout_status()["status"] == "aborted"
    audit = Registry(Settings(home=stack.home)).audit_log(target="support")
    assert [e.actor for e in audit if e.action in ("rollout.start", "rollout.aborted")] == ["key:ops", "key:ops"]
    admin.check()
