"""The web page in a real headless Chromium: upload through ``<input type=file>``, read the page.

The page must show exactly what the API answers for the same file, draw the score map over the
image, and show a readable error for a file that is not an image. The API docs pages (Swagger UI
and ReDoc) must render their operations. The browser can reach nothing but this machine (every
other host name fails to resolve), as on a machine without internet access.
"""

from __future__ import annotations

import os

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from testkit.images import encode, landscape
from testkit.processes import ServerProcess

SCREENSHOT = "/tmp/vggserve-page.png"
# Debian's chromium and chromium-driver; make test installs them when missing and it can.
CHROMIUM = os.environ.get("VGGSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("VGGSERVE_CHROMEDRIVER", "/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not all(os.access(path, os.X_OK) for path in (CHROMIUM, CHROMEDRIVER)),
    reason=f"Chromium ({CHROMIUM}, {CHROMEDRIVER}) is missing; install it as root: "
    "apt-get update && apt-get install -y chromium chromium-driver (make test does it as root)",
)
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    # Offline: only the loopback address resolves, and no proxy could reach out instead.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
]


@pytest.fixture(scope="module")
def server(two_model_repository, tmp_path_factory):
    repo, _ = two_model_repository
    with ServerProcess("--repository", str(repo), log_dir=tmp_path_factory.mktemp("log")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console: CSP blocks
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "landscape.jpg"
    path.write_bytes(encode(landscape(), "JPEG", quality=92))
    return path


def upload(browser, path) -> str:
    """Pick ``path`` in the file input and wait for the page to finish; returns its state."""
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    WebDriverWait(browser, 60).until(
        lambda b: (
            b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
        )
    )
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def shown_predictions(root) -> list[tuple[str, float, str]]:
    """(label, exact probability, displayed percentage) of each listed class, in page order."""
    return [
        (
            item.find_element(By.CLASS_NAME, "label").text,
            float(item.get_attribute("data-probability")),
            item.find_element(By.CLASS_NAME, "probability").text,
        )
        for item in root.find_elements(By.CSS_SELECTOR, "li.prediction")
    ]


def test_page_shows_the_api_answer_and_the_score_map(server, browser, photo):
    browser.get(server.url + "/")
    WebDriverWait(browser, 10).until(
        lambda b: "Serving m16" in b.find_element(By.ID, "models-info").text
    )
    assert upload(browser, photo) == "done"

    # The same file through the API, with the page's parameters.
    params = {"top_k": 5, "mode": "dense", "flip": "true", "heatmap": "true"}
    with photo.open("rb") as f:
        response = httpx.post(
            f"{server.url}/v1/classify",
            params=params,
            files={"file": (photo.name, f, "image/jpeg")},
            timeout=60,
        )
    assert response.status_code == 200
    api = response.json()

    fused = shown_predictions(browser.find_element(By.ID, "predictions"))
    assert [label for label, _, _ in fused] == [p["label"] for p in api["predictions"]]
    for (_, probability, text), expected in zip(fused, api["predictions"], strict=True):
        assert probability == pytest.approx(expected["probability"], abs=1e-9)
        assert text.endswith("%") and float(text[:-1]) == pytest.approx(100 * probability, abs=0.05)
    for name in ("m16", "m19"):
        block = browser.find_element(By.CSS_SELECTOR, f'#per-model [data-model="{name}"]')
        shown = shown_predictions(block)
        assert [label for label, _, _ in shown] == [p["label"] for p in api["per_model"][name]]

    # The score map: drawn at the map's size, stretched over the image, not blank.
    canvas = browser.find_element(By.ID, "heatmap")
    assert canvas.get_attribute("data-drawn") == "true" and canvas.is_displayed()
    heatmap = api["heatmap"]
    assert int(canvas.get_attribute("width")) == heatmap["width"]
    assert int(canvas.get_attribute("height")) == heatmap["height"]
    alphas = browser.execute_script(
        "const c = document.getElementById('heatmap');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return Array.from(d.filter((_, i) => i % 4 === 3));"
    )
    assert len(alphas) == heatmap["width"] * heatmap["height"]
    assert min(alphas) > 0 and max(alphas) > min(alphas)
    image_box = browser.find_element(By.ID, "preview").rect
    canvas_box = canvas.rect
    for key in ("x", "y", "width", "height"):
        assert canvas_box[key] == pytest.approx(image_box[key], abs=1)
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") == 640
    assert heatmap["label"] in browser.find_element(By.ID, "heatmap-caption").text
    browser.save_screenshot(SCREENSHOT)


def test_page_shows_a_clear_error_for_a_bad_file(server, browser, tmp_path):
    browser.get(server.url + "/")
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image\n")
    assert upload(browser, bad) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "notes.txt: 415" in error.text and "not an image" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()


def loaded_urls(browser) -> list[str]:
    """The page's own URL and every resource it has fetched (scripts, styles, images, XHR)."""
    return browser.execute_script(
        "return [location.href].concat("
        "performance.getEntriesByType('resource').map(entry => entry.name));"
    )


def test_api_docs_list_every_operation_offline(server, browser):
    browser.get(server.url + "/")
    browser.find_element(By.LINK_TEXT, "API docs").click()
    WebDriverWait(browser, 30).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock-summary")) >= 5
    )
    assert browser.current_url == server.url + "/docs"
    operations = {
        (
            block.find_element(By.CLASS_NAME, "opblock-summary-method").text,
            block.find_element(By.CLASS_NAME, "opblock-summary-path").get_attribute("data-path"),
        )
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary")
    }
    assert {
        ("POST", "/v1/classify"),
        ("POST", "/v1/classify/batch"),
        ("GET", "/v1/models"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    } <= operations, operations
    urls = loaded_urls(browser)
    assert server.url + "/openapi.json" in urls  # the schema was fetched, so entries are recorded
    assert all(url.startswith(server.url + "/") for url in urls), urls


def test_redoc_lists_every_operation_offline(server, browser):
    browser.get(server.url + "/redoc")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']")
    )
    sections = browser.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']")
    text = " ".join(section.get_attribute("textContent") for section in sections)
    for path in ("/v1/classify", "/v1/classify/batch", "/v1/models", "/healthz", "/readyz"):
        assert path in text
    urls = loaded_urls(browser)
    assert server.url + "/openapi.json" in urls
    # ReDoc's sidebar always asks for its vendor's logo from a CDN; the page's
    # Content-Security-Policy must have stopped it in the browser, before any request was sent.
    console = " ".join(entry["message"] for entry in browser.get_log("browser"))
    for url in urls:
        if not url.startswith(server.url + "/"):
            assert f"'{url}' violates the following Content Security Policy" in console, url
            assert "The action has been blocked" in console
