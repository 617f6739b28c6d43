"""`qks serve`: the web page over a query index, tested through a real server on 127.0.0.1 (a free
port, stopped at the end): searching and tagging in headless Chromium driven by selenium, no file
outside the image root served (path traversal, encoded too), labels escaped, bad input refused."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qks_pipeline.cli.index import serve_cmd
from qks_pipeline.errors import QKSError
from qks_pipeline.index.index import Index
from tests.test_index import build_sample, qks

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("starlette", reason="the serve extra is not installed")

from qks_pipeline.index.serve import image_file, make_app  # noqa: E402 (needs starlette)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SECRET = "the secret beside the image root"
SCRIPT_LABEL = "<script>window.hacked = 1</script>"
WAIT_S = 30  # the longest any wait for the server or the page lasts


@pytest.fixture(scope="module")
def sample(sample_dataset, tiny_clip, tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("serve_sample"), sample_dataset, tiny_clip)


@pytest.fixture(scope="module")
def site(sample, tmp_path_factory) -> Iterator[tuple[str, int, Path]]:
    """(host, port, image root) of a running server over the sample's index; a secret file lies
    beside the image root."""
    base = tmp_path_factory.mktemp("site")
    root = shutil.copytree(sample.images, base / "images")
    (base / "secret.txt").write_text(SECRET)
    (root / "escape").symlink_to(base / "secret.txt")
    cache = base / "label-cache"
    index = Index.open(sample.index, device="cpu", cache_dir=cache)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(index, root), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield "127.0.0.1", port, root
    server.should_exit = True
    thread.join(timeout=WAIT_S)


def _get(site, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no normalisation of `..` or `%2f`)."""
    host, port, _ = site
    connection = http.client.HTTPConnection(host, port, timeout=WAIT_S)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    [
        "/images/../secret.txt",
        "/images/..%2fsecret.txt",
        "/images/..%2Fsecret.txt",
        "/images/%2e%2e/secret.txt",
        "/images/%2e%2e%2fsecret.txt",
        "/images/test/..%2f..%2fsecret.txt",
        "/images/escape",
        "/images//etc/passwd",
        "/images/%2fetc%2fpasswd",
        "/images/test/%00",
    ],
)
def test_no_file_outside_the_image_root_is_served(site, path):
    status, body = _get(site, path)
    assert status == 404 and SECRET.encode() not in body and b"root:" not in body


def test_the_images_under_the_root_are_served(site, sample):
    status, body = _get(site, "/images/test/img000.jpg")
    assert status == 200 and body == (sample.images / "test" / "img000.jpg").read_bytes()
    assert image_file(site[2], "test/img000.jpg") is not None
    assert image_file(site[2], "../secret.txt") is None


def test_labels_come_back_as_data_never_as_markup(site):
    status, body = _get(site, "/api/search?labels=red,%3Cscript%3Ealert(1)%3C/script%3E")
    found = json.loads(body)
    assert status == 200 and found["labels"] == ["red", "<script>alert(1)</script>"]
    assert len(found["hits"]) == 8 and set(found["hits"][0]["scores"]) == set(found["labels"])
    status, page = _get(site, "/")
    assert status == 200 and b"alert" not in page
    status, body = _get(site, "/api/search?labels=,,")
    assert status == 400 and "the label list is empty" in json.loads(body)["error"]
    status, body = _get(site, "/api/tags?row=99&labels=red")
    assert status == 400 and "row 99 is not in the index" in json.loads(body)["error"]


def test_serve_binds_127_0_0_1_by_default_and_refuses_a_missing_root(sample, tmp_path):
    assert next(p for p in serve_cmd.params if p.name == "host").default == "127.0.0.1"
    _, err = qks(
        "serve",
        "--index",
        sample.index,
        "--images",
        tmp_path / "nowhere",
        "--device",
        "cpu",
        expect=1,
    )
    assert "image root is not a directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(QKSError, match="image root is not a directory"):
        make_app(Index.open(sample.index, device="cpu"), tmp_path / "nowhere")


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium or chromedriver is not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    # the installed chromedriver: selenium must not look for (or download) another
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@needs_chromium
def test_type_labels_see_images_click_one_see_its_tags(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    host, port, _ = site
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"http://{host}:{port}/")
    browser.find_element(By.ID, "labels").send_keys(f"red, {SCRIPT_LABEL}")
    browser.find_element(By.ID, "go").click()
    hits = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "figure.hit"))
    assert len(hits) == 8
    assert SCRIPT_LABEL in hits[0].text  # shown as text
    assert browser.execute_script("return window.hacked") is None  # never run
    loaded = "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    wait.until(lambda d: d.execute_script(loaded))
    browser.find_element(By.ID, "vocabulary").send_keys("red, green, blue, circle, square")
    hits[0].click()
    wait.until(ready.visibility_of_element_located((By.ID, "tags")))
    tags = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tags-list li.tag"))
    assert len(tags) == 5
    assert {t.text.rsplit(" ", 1)[0] for t in tags} == {"red", "green", "blue", "circle", "square"}
    assert browser.find_element(By.ID, "tags-image").text == hits[0].text.splitlines()[-1]
