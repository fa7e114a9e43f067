"""The review page in a real headless Chromium (Debian's, driven by Selenium) against the
real review server and the real embedded stack: the queue, two verdicts by keyboard and
click, the counts, and publishing a new data version, which `fod retrain` then trains on.
It takes a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.data_version import read_data_version

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "runs" / "review-page.png"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (make setup installs them as root)",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    driver.implicitly_wait(10)
    yield driver
    driver.quit()


def test_an_operator_reviews_flagged_parts_in_a_browser(
    browser, review, review_repo, stack, tmp_path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(review)
    cards = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card"))
    assert len(cards) >= 2
    assert wait.until(
        lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )  # every overlay loaded
    first, second = (c.get_attribute("data-id") for c in cards[:2])
    browser.find_element(By.ID, "reviewer").send_keys("ana")
    browser.find_element(By.TAG_NAME, "h1").click()  # leave the name field: keys go to the page
    browser.find_element(By.TAG_NAME, "body").send_keys("g")  # the selected (first) card: good
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), f"#{first}: good"))
    card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'.card[data-id="{second}"]'))
    card.find_element(By.CSS_SELECTOR, "button.defective").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), f"#{second}: defective"))
    assert "confirms the model" in browser.find_element(By.ID, "status").text
    shown = {c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    assert first not in shown and second not in shown
    cells = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#counts tbody td"))
    assert [c.text for c in cells[4:7]] == ["2", "1", "1"]  # reviewed, defects, false alarms
    before = read_data_version(review_repo / "data.dvc").md5
    browser.find_element(By.ID, "publish").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "Published 1 good"))
    after = read_data_version(review_repo / "data.dvc").md5
    assert after != before and after[:8] in browser.find_element(By.ID, "status").text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # The retrain check sees a data version no model was trained on, and trains on it: the
    # published part is among the training images the registered version was trained on.
    from mlflow import MlflowClient

    from pipelines.retrain import retrain_once

    report = retrain_once(
        ["widget"], repo_root=review_repo, pipeline_root=tmp_path / "runs", home=stack.home,
        arguments={
            "image_size": 64, "model_size": "compact", "epochs": 2, "batch_size": 4,
            "min_train_images": 4, "min_val_images": 1,
            "min_image_auroc": 0.0, "deploy_target": "none",
            "cache_prefix": "features-review-test",
        },
    )  # fmt: skip
    assert report["trained"] == ["widget"] and report["data_version"] == after
    version = report["results"]["widget"]["new_version"]
    client = MlflowClient()
    registered = client.get_model_version("fod-widget", version)
    assert registered.tags["data_version"] == after
    splits = client.get_run(registered.run_id).data.metrics
    assert splits["split_train"] + splits["split_validation"] == 7  # 6 normals + the reviewed
