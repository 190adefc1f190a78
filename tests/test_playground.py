"""The playground page at ``/`` in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing downloaded) against a real ``bentoml serve`` with
the tiny model and an API key: the form follows /openapi.json, a painted stroke is the mask the page
sends (read back from the browser's own network log over CDP), a run shows its progress, logs and
result, a bad value shows the server's 422, cancel shows cancelled, no key shows the 401, and the
page asks nothing of any host but the server.

``PLAYGROUND_SCREENSHOT=docs/playground.png`` writes the screenshot of the page after its run there
(docs/playground.md shows it); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from runners.front.fal_http import APP_ID
from tests.conftest import FAULT_PATH, REPO, SLOW_PROMPT, bentoml_server, require

KEY = "playground-key"
IMAGE = REPO / "examples" / "image.png"
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text())
# 50 steps that each sleep 0.3 s or more (tests/faults): long on any CPU, without the compute of a large image.
SLOW = {**EXAMPLE, "prompt": SLOW_PROMPT, "sync_mode": False, "num_inference_steps": 50, "strength": 1.0}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 240  # generous: a loaded 2-core machine runs the tiny model slowly


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Skipped without Chromium, failed under CI=true (conftest.require): before any server starts."""
    require(CHROMIUM and CHROMEDRIVER, "the playground tests need Debian's chromium and chromium-driver (make browser)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One request at the model and one waiting, at most: a third gets 429 (test_a_full_queue_says_retry).
    env = {"FLUX_API_KEYS": KEY, "FLUX_QUEUE_CONCURRENCY": "1", "FLUX_QUEUE_MAX_LENGTH": "1", "PYTHONPATH": FAULT_PATH}
    with bentoml_server(tmp_path_factory.mktemp("playground"), **env) as (base, _):
        yield base


class Browser:
    """One headless Chromium for the module, and every network request its pages sent (CDP's
    Network events, from chromedriver's performance log)."""

    def __init__(self, base: str, download_dir: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",  # tests run as root in CI containers
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1360,1900",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        self.downloads = download_dir
        self.driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
        )
        self.driver.set_script_timeout(60)
        self.base = base
        self.requests: list[dict] = []

    def network(self) -> list[dict]:
        """Every request the browser sent so far: CDP ``Network.requestWillBeSent`` params."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"])
        return self.requests

    def open(self) -> None:
        self.driver.get(self.base + "/")
        self.wait_for("document.body.dataset.ready")
        assert self.js("return document.body.dataset.ready") == "true", self.text("#error")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait_for(self, condition: str, timeout: float = WAIT_S):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda d: d.execute_script(f"return {condition}")
        )

    def wait_for_file(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (path.is_file() and path.stat().st_size > 0):
            assert time.monotonic() < deadline, f"{path.name} was not downloaded"
            time.sleep(0.2)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", css)

    def set_value(self, css: str, value: str) -> None:
        """As a person types it: the page reads the control's value, and hears input/change."""
        self.js(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
            css,
            value,
        )

    def set_key(self, key: str) -> None:
        self.set_value("#api-key", key)

    def upload_image(self) -> None:
        self.find("#image-file").send_keys(str(IMAGE))
        self.wait_for("!document.querySelector('#mask-canvas').hidden")

    def stroke(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """Drag the mouse across the mask canvas (image pixels), as W3C pointer actions: the page
        gets real pointerdown/move/up events."""
        from selenium.webdriver.common.actions import interaction
        from selenium.webdriver.common.actions.action_builder import ActionBuilder
        from selenium.webdriver.common.actions.pointer_input import PointerInput

        canvas = self.find("#mask-canvas")
        self.js("arguments[0].scrollIntoView({block: 'center'})", canvas)
        left, top, width, height, image_w, image_h = self.js(
            "const c = arguments[0], r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height, c.width, c.height]",
            canvas,
        )

        def screen(point):
            return round(left + point[0] * width / image_w), round(top + point[1] * height / image_h)

        actions = ActionBuilder(self.driver, mouse=PointerInput(interaction.POINTER_MOUSE, "mouse"))
        middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
        actions.pointer_action.move_to_location(*screen(start)).pointer_down()
        actions.pointer_action.move_to_location(*screen(middle)).move_to_location(*screen(end)).pointer_up()
        actions.perform()

    def submit(self) -> None:
        self.find("#submit").click()

    def state(self) -> str:
        return self.text("#run-state")

    def wait_until_finished(self) -> str:
        self.wait_for(
            "document.querySelector('#submit').disabled === false && document.querySelector('#run-state').dataset.kind"
        )
        return self.state()

    def sent_bodies(self, path: str) -> list[dict]:
        """The JSON bodies of the POSTs to ``path`` the browser sent, as it sent them."""
        bodies = []
        for request in self.network():
            if request["request"]["method"] == "POST" and urlsplit(request["request"]["url"]).path == path:
                posted = request["request"].get("postData")
                if posted is None:  # large bodies are not in the event: ask the browser for it
                    posted = self.driver.execute_cdp_cmd(
                        "Network.getRequestPostData", {"requestId": request["requestId"]}
                    )["postData"]
                bodies.append(json.loads(posted))
        return bodies


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    browser = Browser(server, tmp_path_factory.mktemp("downloads"))
    try:
        browser.open()
        browser.set_key(KEY)  # kept in localStorage: every later page load starts with it
        yield browser
    finally:
        browser.driver.quit()


def decode_data_uri(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def capsule(size: tuple[int, int], start, end, radius: float) -> np.ndarray:
    """The pixels within ``radius`` of the segment start-end: what a round brush stroke covers."""
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]] + 0.5
    (x0, y0), (x1, y1) = start, end
    t = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    return np.hypot(xs - (x0 + t * (x1 - x0)), ys - (y0 + t * (y1 - y0))) <= radius


def js_json(value) -> str:
    """``value`` as JavaScript's JSON.stringify writes it (whole floats without ``.0``)."""
    return json.dumps(value, separators=(",", ":")).replace(".0,", ",").removesuffix(".0")


def test_the_page_is_served_with_a_strict_content_security_policy(server):
    page = httpx.get(server + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    for asset in re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text):
        answer = httpx.get(server + asset, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-content-type-options"] == "nosniff", asset
    assert httpx.get(server + "/playground/nothing.js", timeout=30).status_code == 404
    assert httpx.get(server + "/playground/..%2Fplayground.py", timeout=30).status_code == 404


def test_the_form_shows_every_field_of_the_schema(browser, server):
    browser.open()
    schema = httpx.get(server + "/openapi.json", timeout=30).json()["components"]["schemas"]["InpaintRequest"]
    assert len(schema["properties"]) >= 14
    for name, field in schema["properties"].items():
        shown = browser.text(f'.field[data-field="{name}"]')
        assert shown is not None, f"{name} has no field on the page"
        assert field["description"] in shown, name
        if "default" in field:
            assert ("unset" if field["default"] is None else js_json(field["default"])) in shown, (name, shown)
        for variant in field.get("anyOf", [field]):
            for bound in ("minimum", "maximum"):
                if bound in variant:
                    assert js_json(variant[bound]) in shown, (name, bound, shown)
    assert "1 … 50" in browser.text('.field[data-field="num_inference_steps"]')
    assert "0 … 9223372036854775807" in browser.text('.field[data-field="seed"]')  # exact past 2^53
    assert browser.js("return document.querySelector('#field-num_inference_steps').value") == "28"


STROKE = ((56, 206), (200, 216), 24)  # start, end, brush: across the lawn, where the example's shed goes


def paint_a_run(browser: Browser) -> None:
    """On a fresh page: the example's image uploaded, a stroke painted, 3 steps with seed 7."""
    browser.open()
    browser.upload_image()
    start, end, _ = STROKE
    browser.stroke(start, end)
    browser.set_value("#field-prompt", "a small wooden garden shed on the lawn")
    browser.set_value("#field-num_inference_steps", "3")
    browser.set_value("#field-seed", "7")


def wait_until_idle(server: str) -> None:
    """Nothing queued or running on the server (this module's requests of other tests included), so a
    test that counts on the queue's room starts from the same state whatever ran before it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        values = dict(
            line.rsplit(" ", 1)
            for line in httpx.get(f"{server}/metrics", timeout=30).text.splitlines()
            if line.startswith(("flux_queue_depth ", "flux_in_flight "))
        )
        if values and all(float(v) == 0 for v in values.values()):
            return
        assert time.monotonic() < deadline, f"the server is still busy: {values}"
        time.sleep(0.2)


def test_a_painted_run_sends_the_stroke_as_the_mask_and_shows_the_result(browser, server, tmp_path):
    paint_a_run(browser)
    start, end, brush = STROKE
    assert "mask.png" in browser.text("#snippet") and '"seed": 7' in browser.text("#snippet")
    browser.submit()
    assert browser.wait_until_finished().startswith("Done"), browser.text("#error")

    assert browser.js("return document.querySelector('#progress').value") == 1
    logs = browser.text("#logs")
    assert logs.startswith(tuple("0123456789")) and "queued" in logs and "step 3/3" in logs and "completed" in logs, (
        logs
    )
    image = browser.find("#result img.output")
    # "Done" is shown with the <img> in place; decoding it is the browser's own, later (a loaded machine
    # once read 0x0 here)
    browser.wait_for("document.querySelector('#result img.output').complete")
    assert browser.js("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [256, 256]
    caption = browser.text("#result figcaption")
    assert "seed 7" in caption and "NSFW: no" in caption and "256×256" in caption
    assert "total" in browser.text("#result .timings")
    download = browser.find("#result a.download")
    assert download.get_attribute("download").endswith(".jpg") and "/files/" in download.get_attribute("href")
    download.click()  # the browser saves the stored image, byte for byte
    saved = browser.downloads / download.get_attribute("download")
    browser.wait_for_file(saved)
    assert saved.read_bytes() == httpx.get(download.get_attribute("href"), timeout=30).content
    assert "7" in browser.text("#history li.ok") and "3 steps" in browser.text("#history li.ok")

    (body,) = browser.sent_bodies(f"/queue/{APP_ID}")
    # progress came from the status stream, not from polling the status route
    asked = [urlsplit(r["request"]["url"]).path for r in browser.network()]
    assert any(path.endswith("/status/stream") for path in asked), asked
    assert not any(path.endswith("/status") for path in asked), asked
    assert body["num_inference_steps"] == 3 and body["seed"] == 7 and "strength" not in body  # defaults left out
    assert body["image_url"] == "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    mask = decode_data_uri(body["mask_url"])
    assert mask.size == (256, 256)
    sent = np.asarray(mask.convert("L")) >= 128
    assert set(np.unique(np.asarray(mask.convert("L")))) <= {0, 255}  # black or white, nothing between
    expected = capsule((256, 256), start, end, brush / 2)
    overlap = (sent & expected).sum() / (sent | expected).sum()
    assert overlap > 0.85, f"painted mask matches the stroke by IoU {overlap:.2f}"
    assert not (sent & ~capsule((256, 256), start, end, brush / 2 + 3)).any()  # nothing painted off the stroke

    screenshot = Path(os.environ.get("PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    browser.js("window.scrollTo(0, 0)")
    data = browser.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    shot = Image.open(io.BytesIO(base64.b64decode(data["data"]))).convert("RGB")
    shot.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(screenshot, optimize=True)


def test_copy_as_snippets_run_against_this_server(browser, server, tmp_path):
    """The page's curl, Python and JavaScript for a painted run, run as a person would paste them:
    in a folder holding the uploaded image.png and the page's mask.png download, with FAL_KEY set."""
    paint_a_run(browser)
    (tmp_path / "image.png").write_bytes(IMAGE.read_bytes())
    mask = browser.find("#mask-download").get_attribute("href")
    (tmp_path / "mask.png").write_bytes(base64.b64decode(mask.partition(",")[2]))
    (tmp_path / "node_modules").symlink_to(REPO / "tests" / "js" / "node_modules")
    snippets = {}
    for lang in ("curl", "python", "javascript"):
        browser.find(f'.snippet-tab[data-lang="{lang}"]').click()
        snippets[lang] = browser.text("#snippet")
    assert all(server in text for text in snippets.values())
    commands = {
        "curl": ["bash", "-c", snippets["curl"]],
        "python": [sys.executable, "-c", snippets["python"]],
        "javascript": [shutil.which("node"), "--input-type=module", "-e", snippets["javascript"]],
    }
    env = {**os.environ, "FAL_KEY": KEY}
    for lang, command in commands.items():
        if command[0] is None:
            pytest.fail("node is needed for the JavaScript snippet")
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 0, (lang, done.stdout[-2000:], done.stderr[-2000:])
        assert re.search(rf"{re.escape(server)}/files/[\w-]+\.jpg", done.stdout), (lang, done.stdout[-2000:])
        if lang == "curl":
            output = json.loads(done.stdout)
            assert output["seed"] == 7 and output["images"][0]["width"] == 256


def example_image_as(fmt: str) -> bytes:
    """The example image in ``fmt`` (GIF: its 256 most used colours; AVIF: Pillow's default quality)."""
    picture = Image.open(IMAGE).convert("RGB")
    buffer = io.BytesIO()
    (picture.quantize(256) if fmt == "gif" else picture).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_image_by_drop_paste_and_url(browser, server):
    file_in = (
        "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
        "const data = new DataTransfer(); data.items.add(new File([bytes], arguments[1], {type: arguments[2]}));"
    )
    events = {
        "drop": "document.querySelector('#stage').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}))",
        "paste": "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}))",
    }
    files = {"png": IMAGE.read_bytes(), "gif": example_image_as("gif"), "avif": example_image_as("avif")}
    for name, event in events.items():
        for fmt, data in files.items():  # every format fal accepts that a browser also shows
            if name == "paste" and fmt != "png":
                continue
            browser.open()
            browser.js(file_in + event, base64.b64encode(data).decode(), f"house.{fmt}", f"image/{fmt}")
            browser.wait_for("!document.querySelector('#mask-canvas').hidden")
            assert browser.js(
                "return [document.querySelector('#mask-canvas').width, document.querySelector('#mask-canvas').height]"
            ) == [256, 256]
            assert f"house.{fmt} (256×256" in browser.text('.field[data-field="image_url"]'), (name, fmt)

    # a URL on this server: previewed and painted on; sent as the URL
    output = httpx.post(
        f"{server}/{APP_ID}",
        json={**EXAMPLE, "num_inference_steps": 1, "sync_mode": False},
        headers={"Authorization": f"Key {KEY}"},
        timeout=WAIT_S,
    ).json()
    own = output["images"][0]["url"]
    browser.open()
    browser.set_value("#image-url", own)
    browser.find("#image-url-use").click()
    browser.wait_for("!document.querySelector('#mask-canvas').hidden")
    assert own in browser.text('.field[data-field="image_url"]')
    # another host's URL: the server fetches it, the page does not (no preview, so the mask is uploaded)
    browser.set_value("#image-url", "https://example.com/house.png")
    browser.find("#image-url-use").click()
    browser.wait_for("document.querySelector('#stage-note').textContent.includes('example.com')")
    assert browser.js("return document.querySelector('#mask-canvas').hidden")
    browser.find("#mask-file").send_keys(str(REPO / "examples" / "mask.png"))
    browser.wait_for("document.querySelector('.field[data-field=\"mask_url\"]').textContent.includes('uploaded mask')")
    assert "https://example.com/house.png" in browser.text("#snippet")


def test_an_avif_image_and_a_gif_mask_uploaded_run(browser, tmp_path):
    """The upload buttons offer GIF and AVIF (fal accepts both), and a run with them succeeds: the
    AVIF image is sent as it is, the GIF mask drawn onto the painted canvas."""
    for control in ("#image-file", "#mask-file"):
        assert {"image/gif", "image/avif"} <= set(browser.find(control).get_attribute("accept").split(","))
    (tmp_path / "house.avif").write_bytes(example_image_as("avif"))
    mask = Image.open(REPO / "examples" / "mask.png").convert("L")
    mask.save(tmp_path / "mask.gif")
    browser.open()
    sent_before = len(browser.sent_bodies(f"/queue/{APP_ID}"))
    browser.find("#image-file").send_keys(str(tmp_path / "house.avif"))
    browser.wait_for("!document.querySelector('#mask-canvas').hidden")
    assert "house.avif (256×256" in browser.text('.field[data-field="image_url"]')
    browser.find("#mask-file").send_keys(str(tmp_path / "mask.gif"))
    painted = "document.querySelector('#mask-canvas').getContext('2d').getImageData(0, 0, 256, 256).data.filter((v, i) => i % 4 === 3 && v >= 128).length"
    browser.wait_for(f"{painted} > 0")
    browser.set_value("#field-prompt", "a shed")
    browser.set_value("#field-num_inference_steps", "1")
    browser.submit()
    assert browser.wait_until_finished().startswith("Done"), browser.text("#error")
    body = browser.sent_bodies(f"/queue/{APP_ID}")[sent_before]
    expected = "data:image/avif;base64," + base64.b64encode((tmp_path / "house.avif").read_bytes()).decode()
    assert body["image_url"] == expected
    sent_mask = np.asarray(decode_data_uri(body["mask_url"]).convert("L")) >= 128
    assert (sent_mask == (np.asarray(mask) >= 128)).mean() > 0.98  # the uploaded mask, as painted


def test_the_mask_tools_undo_clear_and_invert(browser):
    browser.open()
    browser.upload_image()
    painted = "return document.querySelector('#mask-canvas').getContext('2d').getImageData(0, 0, 256, 256).data.filter((v, i) => i % 4 === 3 && v >= 128).length"
    browser.stroke((30, 30), (100, 30))
    first = browser.js(painted)
    browser.find("#tool-eraser").click()
    browser.stroke((30, 30), (60, 30))
    erased = browser.js(painted)
    assert 0 < erased < first
    browser.find("#mask-undo").click()
    assert browser.js(painted) == first
    browser.find("#mask-invert").click()
    assert browser.js(painted) == 256 * 256 - first
    browser.find("#mask-clear").click()
    assert browser.js(painted) == 0
    browser.find("#mask-undo").click()
    assert browser.js(painted) == 256 * 256 - first


def test_a_bad_value_shows_the_servers_422(browser):
    browser.open()
    browser.upload_image()
    browser.stroke((64, 64), (128, 128))
    browser.set_value("#field-prompt", "x")
    browser.set_value("#field-num_inference_steps", "500")
    browser.submit()
    assert browser.wait_until_finished() == "Failed"
    error = browser.text("#error")
    assert "422" in error and "num_inference_steps: Input should be less than or equal to 50" in error, error
    assert "invalid" in browser.find('.field[data-field="num_inference_steps"]').get_attribute("class")
    assert "less than or equal to 50" in browser.text('.field[data-field="num_inference_steps"] .field-error')


def test_a_lora_that_cannot_be_loaded_is_named_on_its_row(browser):
    browser.open()
    browser.upload_image()
    browser.stroke((64, 64), (128, 128))
    browser.set_value("#field-prompt", "x")
    browser.set_value("#field-num_inference_steps", "1")
    browser.find(".add-row").click()
    browser.set_value("#field-loras-0-path", "no-such-lora")
    browser.set_value("#field-loras-0-scale", "0.5")
    assert '"loras": [{"path": "no-such-lora", "scale": 0.5}]' in browser.text("#snippet")
    browser.submit()
    assert browser.wait_until_finished() == "Failed"
    assert "loras.0.path" in browser.text("#error"), browser.text("#error")
    assert "invalid" in browser.find('.field[data-field="loras.0.path"]').get_attribute("class")


HOLD_THE_CANCEL_ANSWER_UNTIL_THE_RUN_ENDS = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  if (String(url).endsWith("/cancel")) {
    while (document.querySelector("#submit").disabled) await new Promise((r) => setTimeout(r, 50));
    setTimeout(() => { window.cancelAnswerHandled = true; }, 500);  // after cancel() has read it
  }
  return response;
};
"""


def test_cancel_of_a_long_request_shows_it_cancelled(browser):
    browser.open()
    browser.upload_image()
    browser.stroke((64, 64), (128, 128))
    # Long by tests/faults' sleeping steps. Cancelled at its next step, the run can end before the
    # cancel's own answer reaches the page, and that late answer must not paint "Cancelling" over
    # "Cancelled" (main.js cancel() once did). The page's fetch is wrapped to hold that answer until
    # the run has ended, so this order happens every time.
    browser.set_value("#field-prompt", f"a long one, {SLOW_PROMPT}")
    browser.set_value("#field-num_inference_steps", "50")
    browser.set_value("#field-strength", "1")
    browser.js(HOLD_THE_CANCEL_ANSWER_UNTIL_THE_RUN_ENDS)
    browser.submit()
    browser.wait_for("/step \\d+\\/50/.test(document.querySelector('#logs').textContent)")  # running, streamed
    browser.find("#cancel").click()
    browser.wait_for("window.cancelAnswerHandled === true")
    assert browser.wait_until_finished() == "Cancelled", browser.text("#error")
    assert "request_cancelled" in browser.text("#error") and "cancelled" in browser.text("#error")
    assert 0 < browser.js("return document.querySelector('#progress').value") < 1


def test_a_full_queue_says_retry(browser, server):
    headers = {"Authorization": f"Key {KEY}"}
    queue = f"{server}/queue/{APP_ID}"
    wait_until_idle(server)  # the room in the queue is what this test counts on

    def status(request: dict) -> str:
        return httpx.get(request["status_url"], headers=headers, timeout=60).json()["status"]

    started = [httpx.post(queue, json=SLOW, headers=headers, timeout=60).json()]
    try:
        while status(started[0]) == "IN_QUEUE":  # at the model: the next one waits, and fills the queue
            time.sleep(0.2)
        started.append(httpx.post(queue, json=SLOW, headers=headers, timeout=60).json())
        browser.open()
        browser.upload_image()
        browser.stroke((64, 64), (128, 128))
        browser.set_value("#field-prompt", "x")
        browser.submit()
        assert browser.wait_until_finished() == "Failed"
        error = browser.text("#error")
        assert "429 queue_full" in error and "Retry in 5 seconds" in error, error
    finally:
        for request in started:
            httpx.put(request["cancel_url"], headers=headers, timeout=60)
        for request in started:
            while status(request) != "COMPLETED":
                time.sleep(0.5)


def test_a_missing_key_shows_the_401(browser):
    browser.open()
    browser.set_key("")
    try:
        browser.upload_image()
        browser.stroke((64, 64), (128, 128))
        browser.set_value("#field-prompt", "x")
        browser.submit()
        assert browser.wait_until_finished() == "Failed"
        error = browser.text("#error")
        assert "401 unauthorized" in error and "Unauthorized" in error and "API key" in error, error
    finally:
        browser.set_key(KEY)


def test_the_page_asks_nothing_of_any_other_host(browser, server):
    """Every request the browser sent in this module, from its own network log: this test's own
    painted run and download (whatever ran before it), and all the others' that ran before it."""
    paint_a_run(browser)
    browser.set_value("#field-num_inference_steps", "1")
    browser.submit()
    assert browser.wait_until_finished().startswith("Done"), browser.text("#error")
    browser.find("#result a.download").click()
    browser.wait_for_file(browser.downloads / browser.find("#result a.download").get_attribute("download"))
    requests = browser.network()
    paths = {urlsplit(r["request"]["url"]).path for r in requests}
    assert {"/", "/openapi.json", "/playground/main.js", "/playground/mask-painter.js", f"/queue/{APP_ID}"} <= paths
    assert any(path.endswith("/status/stream") for path in paths) and any(p.startswith("/files/") for p in paths)
    origins = {f"{urlsplit(r['request']['url']).scheme}://{urlsplit(r['request']['url']).netloc}" for r in requests}
    assert origins - {"data://", "blob://"} == {server}, origins
