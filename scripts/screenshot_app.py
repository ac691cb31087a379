"""A screenshot of ``prompt-ris app`` in headless Chromium, on the first example scene with its
expressions answered (for the README).

Usage: ``python scripts/screenshot_app.py [--out docs/images/app.png]``; needs the app extra,
selenium, and Debian's ``chromium`` + ``chromedriver``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1400, 1150  # browser window; the picture is saved at half that


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "app.png"))
    args = parser.parse_args(argv)
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(REPO / "tests"))
    from app_server import served_app  # the app on a free loopback port

    options = Options()
    for flag in ("--headless=new", "--no-sandbox", f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "chromium"
    with served_app() as served:
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(served.url)
            thumbs = "#examples button.thumbnail-item"
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, thumbs))
            driver.find_elements(By.CSS_SELECTOR, thumbs)[0].click()
            WebDriverWait(driver, 60).until(
                lambda d: "answered" in d.find_element(By.CSS_SELECTOR, "#status").text
            )
            WebDriverWait(driver, 60).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#pictures img")
            )
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    shot = Image.open(args.out)
    shot.resize((shot.width // 2, shot.height // 2), Image.LANCZOS).save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
