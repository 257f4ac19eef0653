"""The web page in headless Chromium (Selenium) against a real uvicorn server.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Missing browsers
make the test FAIL, not skip, so CI cannot silently lose this check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from multichex.data.sources import bundled_sample_root
from multichex.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60


@pytest.fixture(scope="module")
def server_url(predictor) -> Iterator[str]:
    """A real uvicorn server with a tiny 64 px model, on a free port of 127.0.0.1, in a thread."""
    app = create_app(predictor)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one; uvicorn serves on this very socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Headless Debian Chromium driven by Debian's chromedriver; fails clearly when they are missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install Debian's browser with "
                    "`apt-get install -y chromium chromium-driver` (.ci/run does this in CI)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def test_page_shows_the_same_probabilities_as_the_api(server_url, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    xray = sorted((bundled_sample_root() / "nih-cxr14-bbox" / "images").glob("*.png"))[0]
    driver.get(server_url + "/")
    banner = driver.find_element(By.ID, "banner")
    assert "not for clinical use" in banner.text.lower()
    assert banner.is_displayed()
    assert driver.find_element(By.ID, "heatmap-toggle").get_attribute("disabled") is not None

    driver.find_element(By.ID, "file-input").send_keys(str(xray))
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "status").text in {"done", "error"})
    assert driver.find_element(By.ID, "status").text == "done", driver.find_element(By.ID, "error").text
    wait.until(lambda d: d.execute_script(
        "const img = document.getElementById('overlay'); return img.complete && img.naturalWidth > 0;"))

    with open(xray, "rb") as handle:
        api = httpx.post(server_url + "/predict", files={"file": (xray.name, handle, "image/png")}, timeout=WAIT_S)
    assert api.status_code == 200, api.text
    expected = api.json()["classes"]

    rows = driver.find_elements(By.CSS_SELECTOR, "tr[data-class]")
    shown = {row.get_attribute("data-class"): row.find_element(By.CSS_SELECTOR, "td.prob").text for row in rows}
    assert shown == {name: f"{p:.3f}" for name, p in expected.items()}
    order = [row.get_attribute("data-class") for row in rows]
    assert order == sorted(expected, key=lambda name: -expected[name]), "rows must be sorted by probability"
    gate = api.json()["gate"]
    assert driver.find_element(By.ID, "gate").text == (
        f"gate: {'positive' if gate['positive'] else 'negative'} (p = {gate['probability']:.3f})")


def test_page_shows_server_errors(server_url, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image\n")
    driver.get(server_url + "/")
    driver.find_element(By.ID, "file-input").send_keys(str(not_an_image))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text == "error")
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "415" in error.text and "not PNG, JPEG or DICOM" in error.text


def test_heatmap_toggle_switches_the_image(server_url, driver, xray, fake_heatmaps):
    """With ``urls.heatmaps`` non-empty the toggle is enabled and swaps the displayed image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server_url + "/")
    driver.find_element(By.ID, "file-input").send_keys(str(xray))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text == "done")
    toggle = driver.find_element(By.ID, "heatmap-toggle")
    image = driver.find_element(By.ID, "overlay")
    assert toggle.is_enabled()
    assert image.get_attribute("src").endswith("_overlay.png")
    toggle.click()
    assert image.get_attribute("src").endswith("_cam_0.png")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "const img = document.getElementById('overlay'); return img.complete && img.naturalWidth > 0;"))
    toggle.click()
    assert image.get_attribute("src").endswith("_overlay.png")


def test_page_shows_the_client_file_name_as_escaped_text(server_url, driver, xray, tmp_path):
    """A file name with markup is shown literally (HTML-escaped), never as the server's uuid upload name."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = "<b>chest & 1>.png"
    upload = tmp_path / name
    upload.write_bytes(xray.read_bytes())
    driver.get(server_url + "/")
    driver.find_element(By.ID, "file-input").send_keys(str(upload))
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text in {"done", "error"})
    assert driver.find_element(By.ID, "status").text == "done", driver.find_element(By.ID, "error").text
    caption = driver.find_element(By.ID, "image-name")
    assert caption.text == name
    assert caption.get_attribute("innerHTML") == "&lt;b&gt;chest &amp; 1&gt;.png"
    assert not caption.find_elements(By.TAG_NAME, "b")
