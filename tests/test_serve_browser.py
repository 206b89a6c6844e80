"""The web page end to end: a real server on 127.0.0.1 and the system's headless Chromium driven by Selenium."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "page-key"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs the system's Chromium and ChromeDriver (apt-get install chromium chromium-driver)",
)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("page-images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, color in COLORS.items():
        pixels = np.clip(np.array(color) + rng.normal(0, 20, (64, 80, 3)), 0, 255).astype(np.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory, images):
    """A real uvicorn server in a thread, over a store holding the four images."""
    import rosetta
    from rosetta.serve import Settings, create_app
    from rosetta.store import open_store
    from rosetta.store.index import index_files

    model = rosetta.create("tiny").eval()
    model.name = "tiny"
    store = open_store(tmp_path_factory.mktemp("page-store") / "store", model="tiny", dim=64)
    index_files(model, store, list(images.values()), progress=False)
    with serving(create_app(model, store, Settings(api_key=KEY))) as url:
        yield url
    store.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _results(driver) -> list[dict]:
    """The result cards: name, score, and whether the thumbnail loaded."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .result')].map(card => ({
            name: card.querySelector('.name').title,
            score: parseFloat(card.querySelector('.score').textContent),
            loaded: card.querySelector('img').complete && card.querySelector('img').naturalWidth > 0,
        }));""")


def _search(driver, submit=None) -> list[dict]:
    """Start a search (click the button, or `submit()`), and return the new results once their thumbnails loaded."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('results').replaceChildren()")  # no stale results
    (submit or driver.find_element(By.ID, "search-btn").click)()
    _wait(driver, lambda d: _thumbnails_loaded(d, 4))
    return _results(driver)


def _thumbnails_loaded(driver, n: int) -> bool:
    results = _results(driver)
    return len(results) == n and all(r["loaded"] for r in results)


def test_page_search_by_text_by_image_and_classify(server, browser, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(server + "/")
    # Without the key the page says so; with it (saved in localStorage) the model appears.
    _wait(driver, lambda d: "API key" in d.find_element(By.ID, "message").text)
    driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    _wait(driver, lambda d: "tiny" in d.find_element(By.ID, "model").text)
    assert driver.execute_script("return localStorage.getItem('rosetta.apiKey')") == KEY
    assert "4 stored" in driver.find_element(By.ID, "store").text

    # A text query: a grid of results, each with a thumbnail that loaded and a score.
    results = _search(driver, lambda: driver.find_element(By.ID, "query-text").send_keys("a red square", Keys.ENTER))
    assert {Path(r["name"]).name for r in results} == {p.name for p in images.values()}
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)

    # An image query (text cleared): the same image comes first, with a score of 1.
    driver.find_element(By.ID, "query-text").clear()
    driver.find_element(By.ID, "search-file").send_keys(str(images["blue"]))
    _wait(driver, lambda d: d.find_element(By.ID, "search-preview").is_displayed())
    results = _search(driver)
    assert Path(results[0]["name"]).name == "blue.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-3)

    # Drag and drop: a file dropped on the zone replaces the chosen one.
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('search-drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    """, base64.b64encode(images["green"].read_bytes()).decode())
    results = _search(driver)
    assert Path(results[0]["name"]).name == "green.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-3)

    # Text and image together: the weights slider comes alive.
    driver.find_element(By.ID, "query-text").send_keys("green")
    assert driver.find_element(By.ID, "weight").is_enabled()
    _search(driver)

    # Zero-shot classification of an uploaded image against typed labels.
    driver.find_element(By.ID, "classify-file").send_keys(str(images["yellow"]))
    labels = driver.find_element(By.ID, "labels")
    labels.clear()
    labels.send_keys("sunflower, ocean, forest")
    driver.find_element(By.ID, "classify-btn").click()
    label = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#classify-result .top-label").text)
    assert label in {"sunflower", "ocean", "forest"}
    assert len(driver.find_elements(By.CSS_SELECTOR, "#classify-result .bar")) == 3
    assert not driver.find_element(By.ID, "message").is_displayed()  # no error shown

    screenshot = tmp_path / "page.png"
    driver.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] >= 1000
    if target := os.environ.get("ROSETTA_SCREENSHOT"):  # to look at it: ROSETTA_SCREENSHOT=/tmp/page.png
        shutil.copy(screenshot, target)


def test_page_shows_api_errors(server, browser, images):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server + "/")
    driver.execute_script("localStorage.setItem('rosetta.apiKey', 'wrong')")
    driver.get(server + "/")
    message = _wait(driver, lambda d: d.find_element(By.ID, "message").text)
    assert "wrong API key" in message and "unauthorized" in message
    driver.execute_script(f"localStorage.setItem('rosetta.apiKey', '{KEY}')")
    driver.get(server + "/")
    _wait(driver, lambda d: "tiny" in d.find_element(By.ID, "model").text)
    bad = Path(images["red"]).with_name("not-an-image.png")
    bad.write_bytes(b"this is not a png")
    driver.find_element(By.ID, "classify-file").send_keys(str(bad))
    driver.find_element(By.ID, "classify-btn").click()
    message = _wait(driver, lambda d: d.find_element(By.ID, "message").text)
    assert "not-an-image.png" in message and "invalid_image" in message


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    """A server with a model that hears, over a store of a recording of two tones and a video of two colours."""
    from conftest import hearing_model, write_tones, write_video

    from rosetta.serve import Settings, create_app
    from rosetta.store import open_store
    from rosetta.store.index import index_source, model_name

    root = tmp_path_factory.mktemp("page-media")
    write_tones(root / "tones.wav", (300, 1.44), (1500, 1.44))
    write_video(root / "colours.mp4", [(220, 30, 30), (30, 60, 220)])
    model = hearing_model()
    store = open_store(tmp_path_factory.mktemp("page-media-store") / "store", model=model_name(model), dim=64)
    index_source(model, store, root, progress=False)
    with serving(create_app(model, store, Settings(api_key=KEY))) as url:
        yield url, root
    store.close()


def test_page_searches_by_sound_and_cues_recordings_at_the_match(media_server, browser, tmp_path):
    from conftest import write_tones
    from selenium.webdriver.common.by import By

    url, root = media_server
    driver = browser
    driver.get(url + "/")
    driver.execute_script(f"localStorage.setItem('rosetta.apiKey', '{KEY}')")
    driver.get(url + "/")
    _wait(driver, lambda d: "4 stored" in d.find_element(By.ID, "store").text)  # rows: two windows of each file
    driver.find_element(By.ID, "search-file").send_keys(str(write_tones(tmp_path / "high.wav", (1500, 1.44))))
    _wait(driver, lambda d: d.find_element(By.ID, "search-sound").is_displayed())
    driver.find_element(By.ID, "search-btn").click()
    cards = _wait(driver, lambda d: d.execute_script("""
        const cards = [...document.querySelectorAll('#results .result')].map(card => ({
            name: card.querySelector('.name').title, tag: card.querySelector('.thumb').tagName,
            src: card.querySelector('.thumb').getAttribute('src') || '', when: card.querySelector('.when').textContent,
        }));
        return cards.length === 2 && cards.every(c => c.src.includes('#t=')) ? cards : null;"""))
    # The recording comes first, cued at its second window; the video is cued at its best window too.
    assert Path(cards[0]["name"]).name == "tones.wav" and cards[0]["tag"] == "AUDIO"
    assert cards[0]["src"].startswith("blob:") and cards[0]["src"].endswith("#t=1.44,2.88")
    assert cards[0]["when"] == "0:01.4 – 0:02.9"
    assert Path(cards[1]["name"]).name == "colours.mp4" and cards[1]["tag"] == "VIDEO"
    # The player honours the fragment: once the sound's metadata is in, it stands at the window's start.
    start = _wait(driver, lambda d: d.execute_script(
        "const a = document.querySelector('#results audio'); return a.readyState >= 1 ? a.currentTime : null;"))
    assert start == pytest.approx(1.44, abs=0.05)
    assert not driver.find_element(By.ID, "message").is_displayed()


@pytest.fixture(scope="module")
def vlm_server():
    """tiny-vlm as `rosetta serve --model tiny-vlm --random-init` builds it, behind the API key."""
    import torch

    import rosetta
    from rosetta.serve import Settings, create_app

    torch.manual_seed(0)
    model = rosetta.create("tiny-vlm").eval()
    model.name = "tiny-vlm"
    with serving(create_app(model, None, Settings(api_key=KEY, max_sequences=4))) as url:
        yield url, model


def _settled(driver, selector: str) -> str | None:
    """The text of the element once its answer came (the page marks it aria-busy until then)."""
    return driver.execute_script("""
        const element = document.querySelector(arguments[0]);
        return element && !element.hidden && !element.hasAttribute('aria-busy') ? element.textContent : null;""",
                                 selector)


def _drop(driver, path: Path, zone: str) -> None:
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
        document.getElementById(arguments[2]).dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
    """, base64.b64encode(path.read_bytes()).decode(), path.name, zone)


@pytest.mark.usefixtures("one_thread")
def test_image_panel_captions_and_answers(vlm_server, browser, images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, model = vlm_server
    red, blue = Image.open(images["red"]), Image.open(images["blue"])
    # The model's own replies, worked out before the page asks, so that the server's thread has it to itself.
    captions = {"red": model.caption(red, max_new_tokens=12), "blue": model.caption(blue, max_new_tokens=12)}
    answer = model.ask(red, "What colour is it?", max_new_tokens=12)
    assert captions["red"] != captions["blue"]  # else the page's second caption could not be told from its first
    driver = browser
    driver.get(url + "/")
    driver.execute_script(f"localStorage.setItem('rosetta.apiKey', '{KEY}')")
    driver.get(url + "/")
    _wait(driver, lambda d: d.find_element(By.ID, "vision-card").is_displayed())
    assert driver.find_element(By.ID, "model").text == "tiny-vlm"
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("12")

    # A chosen image: previewed, captioned as the model captions it.
    driver.find_element(By.ID, "vision-file").send_keys(str(images["red"]))
    assert _wait(driver, lambda d: _settled(d, "#caption")) == captions["red"]
    assert driver.find_element(By.ID, "vision-preview").is_displayed()

    # A question about it: the answer appears under it, the model's own.
    driver.find_element(By.ID, "question").send_keys("What colour is it?", Keys.ENTER)
    assert _wait(driver, lambda d: _settled(d, "#answers .answer")) == answer
    assert driver.find_element(By.CSS_SELECTOR, "#answers .question").text == "What colour is it?"

    # A dropped image replaces it: its own caption, and the answers about the other one are gone.
    _drop(driver, images["blue"], "vision-drop")
    assert _wait(driver, lambda d: _settled(d, "#caption") == captions["blue"])
    assert not driver.find_elements(By.CSS_SELECTOR, "#answers .turn")
    assert not driver.find_element(By.ID, "message").is_displayed()


def test_image_panel_only_for_models_that_read_images(browser):
    from selenium.webdriver.common.by import By

    import rosetta
    from rosetta.serve import Settings, create_app

    model = rosetta.create("tiny-lm").eval()
    model.name = "tiny-lm"
    with serving(create_app(model, None, Settings())) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: d.find_element(By.ID, "model").text == "tiny-lm")
        assert not browser.find_element(By.ID, "vision-card").is_displayed()
        assert browser.find_element(By.ID, "chat-input").is_displayed()


def test_image_panel_with_a_hosted_model(browser, images, tmp_path):
    from fake_vendors import fake_vendor, sent_images
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from rosetta.hosted import load_hosted
    from rosetta.serve import Settings, create_app

    pytest.importorskip("openai")
    with fake_vendor("openai") as fake:
        model = load_hosted("openai:gpt-4o", api_key="vendor-key", base_url=f"{fake.url}/v1", cache=tmp_path)
        with serving(create_app(model, None, Settings(api_key=KEY))) as url:
            browser.get(url + "/")
            browser.execute_script(f"localStorage.setItem('rosetta.apiKey', '{KEY}')")
            browser.get(url + "/")
            _wait(browser, lambda d: d.find_element(By.ID, "vision-card").is_displayed())
            browser.find_element(By.ID, "vision-file").send_keys(str(images["green"]))
            assert _wait(browser, lambda d: _settled(d, "#caption")) == "a red square on a white background"
            browser.find_element(By.ID, "question").send_keys("And the colour?", Keys.ENTER)
            assert _wait(browser, lambda d: _settled(d, "#answers .answer")) == "a red square on a white background"
    assert [len(sent_images(fake, r)) for r in fake.requests] == [1, 1]
    assert Image.open(io.BytesIO(sent_images(fake, fake.requests[0])[0])).size == Image.open(images["green"]).size
    assert all(KEY not in json.dumps(r) for r in fake.requests)  # the page's key is the server's, never passed on
