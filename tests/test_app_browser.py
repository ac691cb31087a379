"""``prompt-ris app`` driven in headless Chromium (Debian's ``chromium`` and ``chromedriver``,
with selenium): an example scene and two expressions give on the page exactly the masks of
``PromptRIS.predict``; bad inputs give their messages in the page and the app keeps answering."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_server import served_app
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e .[app]")
pytest.importorskip("selenium", reason="selenium is not installed: pip install -e .[app]")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "headless Chromium is not installed: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
WAIT_S = 60


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[webdriver.Chrome, object]]:
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1800"):  # fmt: skip
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    with served_app() as served:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.get(served.url)
            WebDriverWait(driver, WAIT_S).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item")
            )
            yield driver, served
        finally:
            driver.quit()


def _status(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def _masks_value(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#masks textarea").get_attribute("value") or ""


def _expressions_shown(driver: webdriver.Chrome) -> list[str]:
    return [entry["expression"] for entry in json.loads(_masks_value(driver) or "[]")]


def _type_expressions(driver: webdriver.Chrome, lines: list[str]) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#expressions textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)  # as a user deletes: the page hears it (clear() is silent)
    if lines:
        box.send_keys("\n".join(lines))  # Enter makes a new line in a multi-line box


def _segment_and_wait(driver: webdriver.Chrome, done) -> None:  # noqa: ANN001
    driver.find_element(By.CSS_SELECTOR, "#segment").click()
    WebDriverWait(driver, WAIT_S).until(done)


def test_example_scene_two_expressions_give_predicts_masks(page) -> None:  # noqa: ANN001
    from prompt_ris.app.scenes import example_scenes
    from prompt_ris.data.rle import decode_rle

    driver, served = page
    scene = example_scenes()[0]
    driver.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item")[0].click()
    WebDriverWait(driver, WAIT_S).until(lambda d: _expressions_shown(d) == scene.expressions)
    texts = [scene.expressions[0], "the shape on the far side"]
    _type_expressions(driver, texts)
    _segment_and_wait(driver, lambda d: _expressions_shown(d) == texts)
    shown = json.loads(_masks_value(driver))
    want = served.model.predict(scene.image, texts)
    for k, entry in enumerate(shown):
        np.testing.assert_array_equal(decode_rle(entry["mask"]), want.masks[k])
    assert shown[0]["iou"] is not None  # the example knows its ground truth
    assert "answered" in _status(driver)
    pictures = driver.find_elements(By.CSS_SELECTOR, "#pictures img")
    assert len(pictures) >= 2  # one picture of the method per expression


def test_bad_inputs_give_messages_and_the_app_keeps_answering(
    page, tmp_path: Path  # noqa: ANN001
) -> None:
    from prompt_ris.app.scenes import example_scenes

    driver, _ = page
    scene = example_scenes()[1]
    driver.find_elements(By.CSS_SELECTOR, "#examples button.thumbnail-item")[1].click()
    WebDriverWait(driver, WAIT_S).until(lambda d: _expressions_shown(d) == scene.expressions)

    _type_expressions(driver, [])
    _segment_and_wait(driver, lambda d: "no expression" in _status(d))

    _type_expressions(driver, ["the " + "very " * 30 + "red shape"])
    _segment_and_wait(driver, lambda d: "was cut" in _status(d))

    upload = driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]")
    fake = tmp_path / "not_an_image.png"
    fake.write_text("this is text, not a picture")
    upload.send_keys(str(fake))
    WebDriverWait(driver, WAIT_S).until(lambda d: "not an image" in _status(d))

    big = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000), (90, 90, 90)).save(big)
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(big))
    WebDriverWait(driver, WAIT_S).until(lambda d: "downscale it" in _status(d))

    driver.find_element(By.CSS_SELECTOR, "#new-scene").click()  # and it still answers
    WebDriverWait(driver, WAIT_S).until(lambda d: "answered" in _status(d))
    assert _expressions_shown(driver)
