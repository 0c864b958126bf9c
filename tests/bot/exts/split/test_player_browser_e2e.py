"""The stem player in a real browser: Debian's Chromium, headless, driven by Selenium, opens the
player of a real job of the real bot, from the **Open player** button of its result message.

One bot, one job and one browser for the module (CI's time is short): the tests run in order
and each leaves the page as it found it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from core.storage.signed_links import LinkSigner
from tests.bot.helpers import final_message, upload
from tests.support.fake_discord import attachment_option

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which("chromium") is None or not Path("/usr/bin/chromedriver").exists(),
                       reason="needs Debian's chromium and chromium-driver (scripts/test installs them)"),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SECONDS = 4.0
STEMS = ["drums", "bass", "other", "vocals"]


def link_buttons(message) -> dict[str, str]:
    return {c["label"]: c["url"] for row in message.components for c in row.get("components", []) if c.get("url")}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def job(fake, bot, tmp_path_factory):
    """(player URL, job id) of one split song."""
    tmp = tmp_path_factory.mktemp("player")
    # One tone, so that the pitch checks below measure the same spectrum on every run.
    att = upload(fake, tmp, "practice.wav", seconds=SECONDS, tone=330.0)
    result = await final_message(fake, await fake.send_slash_command("split", [attachment_option("file", att)]))
    assert "Done" in result.content
    url = link_buttons(result)["Open player"]
    return url, url.split("/player/")[1].split("?")[0], result.content


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              # A mix is downloaded when it is rendered, after the click.
                                              "profile.default_content_setting_values.automatic_downloads": 1})
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 20.0, what: str = "the page"):
    return WebDriverWait(driver, timeout).until(condition, message=f"waiting for {what}")


def page_state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


@pytest.fixture(scope="module")
def player(browser, job):
    url, *_ = job
    browser.get(url)
    wait(browser, lambda d: page_state(d) in ("ready", "error"), what="the stems to load")
    assert page_state(browser) == "ready", browser.find_element(By.ID, "status").text
    return browser


async def test_the_page_shows_the_tempo_and_key_of_the_result_message(player, job):
    """The message and the page show the same checked analysis of the track."""
    *_, content = job
    said = re.search(r"· (?:([0-9]+) BPM · )?([A-G]#? (?:major|minor)) ·", content)
    assert said is not None, content  # the model host always finds a key in non-silent stems
    facts = player.find_element(By.ID, "facts").text
    assert f"Key {said[2]}" in facts
    if said[1]:
        assert f"BPM {said[1]}" in facts
    else:
        assert "BPM" not in facts


def set_range(driver, element_id: str, value: float) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, value)


def press(driver, *keys) -> None:
    driver.find_element(By.TAG_NAME, "body").send_keys(*keys)


def download_mix(driver, downloads: Path) -> Path:
    """Click "Download this mix", wait for the file and move it to `downloads/kept/` (so the
    next mix, whatever its name, arrives in an empty folder)."""
    driver.find_element(By.ID, "download-mix").click()

    def done(_):
        return next(iter(downloads.glob("*.wav")), False)

    path = wait(driver, done, what=f"the mix to download ({driver.find_element(By.ID, 'status').text!r})")
    kept = downloads / "kept" / f"{len(list(downloads.glob('kept/*')))}-{path.name}"
    kept.parent.mkdir(exist_ok=True)
    return path.rename(kept)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert (w.getsampwidth(), w.getnchannels()) == (2, 2)
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768
        return frames.reshape(-1, 2).T, w.getframerate()


def ffprobe_duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return float(out)


def dominant_frequency(audio: np.ndarray, rate: int, low: float = 150.0, high: float = 4000.0) -> float:
    """The strongest frequency between `low` and `high` (the tiny test model's stems also
    carry a DC offset and a whine near a quarter of the sample rate)."""
    mono = audio.mean(axis=0) - audio.mean()
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    freqs = np.fft.rfftfreq(len(mono), 1 / rate)
    band = (freqs >= low) & (freqs <= high)
    return float(freqs[band][np.argmax(spectrum[band])])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)))


async def test_every_stem_is_listed(player):
    rows = player.find_elements(By.CSS_SELECTOR, "#stems .stem")
    assert [row.get_attribute("data-stem") for row in rows] == STEMS
    for row in rows:
        link = row.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("download") == f"{row.get_attribute('data-stem')}.mp3"
        assert "/dl/" in link.get_attribute("href")
    assert player.find_element(By.ID, "duration").text == "0:04"
    assert player.find_element(By.TAG_NAME, "body").get_attribute("data-engine") == "worklet"


async def test_play_advances_the_time_and_mute_silences_the_output(player):
    press(player, Keys.SPACE)
    wait(player, lambda d: float(d.find_element(By.ID, "time").get_attribute("data-seconds")) > 0.3,
         what="the time to advance")
    assert page_state(player) == "playing"
    level = player.execute_script("return window.stemPlayer.level()")
    assert level > 1e-3, "something plays"
    for n in range(1, 5):
        press(player, Keys.SHIFT, str(n))  # Shift+N mutes stem N
    await asyncio.sleep(0.2)
    assert player.execute_script("return window.stemPlayer.level()") < 1e-6, "every stem muted: silence"
    for n in range(1, 5):
        press(player, Keys.SHIFT, str(n))
    press(player, Keys.SPACE)
    wait(player, lambda d: page_state(d) == "ready", what="the pause")
    assert all(b.get_attribute("aria-pressed") == "false" for b in player.find_elements(By.CSS_SELECTOR, ".mute"))


async def test_a_muted_stem_is_absent_from_the_downloaded_mix(player, downloads):
    everything, rate = read_wav(download_mix(player, downloads))
    press(player, "4")  # solo vocals
    vocals, _ = read_wav(download_mix(player, downloads))
    press(player, "4")
    player.find_element(By.CSS_SELECTOR, "[data-stem='vocals'] .mute").click()
    without_vocals, _ = read_wav(download_mix(player, downloads))
    player.find_element(By.CSS_SELECTOR, "[data-stem='vocals'] .mute").click()
    assert everything.shape == vocals.shape == without_vocals.shape
    assert everything.shape[1] == pytest.approx(SECONDS * rate, abs=0.1 * rate)
    assert rms(vocals) > 1e-3 and rms(without_vocals) > 1e-3
    # At 100 % the mix is the sum of the stems: the muted one is exactly what is missing
    # (to the rounding of 16-bit samples).
    assert np.max(np.abs(everything - without_vocals - vocals)) <= 3 / 32768
    assert rms(everything - without_vocals) == pytest.approx(rms(vocals), rel=0.01)


async def test_the_mix_at_80_percent_is_longer_at_the_same_pitch_and_transposes(player, downloads):
    original, rate = read_wav(download_mix(player, downloads))
    pitch = dominant_frequency(original, rate)
    set_range(player, "tempo", 80)
    slower_path = download_mix(player, downloads)
    set_range(player, "transpose", 12)
    try:
        higher_path = download_mix(player, downloads)
    finally:
        player.find_element(By.ID, "reset").click()
    assert slower_path.name.endswith("-mix-80pct.wav") and higher_path.name.endswith("-mix-80pct+12st.wav")
    for path in (slower_path, higher_path):
        assert ffprobe_duration(path) == pytest.approx(1.25 * original.shape[1] / rate, abs=0.01)
    slower, _ = read_wav(slower_path)
    higher, _ = read_wav(higher_path)
    assert rms(slower) > 0.5 * rms(original) and rms(higher) > 0.3 * rms(original)
    assert dominant_frequency(slower, rate) == pytest.approx(pitch, rel=0.02), "tempo keeps the pitch"
    assert dominant_frequency(higher, rate) == pytest.approx(2 * pitch, rel=0.03), "+12 st is an octave up"


async def test_tampered_and_expired_links_are_refused(browser, bot, job):
    url, job_id, _ = job
    secret = bytes.fromhex((bot.data_dir / "link_secret").read_text().strip())
    expired = LinkSigner(secret, bot.web_url).sign_player(job_id, time.time() - 60)
    tampered = url.replace(f"/player/{job_id}?", f"/player/{int(job_id) + 1}?")
    async with aiohttp.ClientSession() as session:
        for link, status in ((tampered, 403), (expired, 410), (url + "0", 403)):
            async with session.get(link) as response:
                assert response.status == status, link
    browser.get(tampered)
    assert "invalid link" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(expired)
    assert "link expired" in browser.find_element(By.TAG_NAME, "body").text


async def test_without_audio_worklets_the_same_mixer_plays_on_the_page(browser, job):
    """Plain http away from localhost has no AudioWorklet: the ScriptProcessor fallback."""
    url, *_ = job
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": "delete window.AudioWorkletNode;"})
    try:
        browser.get(url)
        wait(browser, lambda d: page_state(d) in ("ready", "error"), what="the stems to load")
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-engine") == "script-processor"
        press(browser, Keys.SPACE)
        wait(browser, lambda d: float(d.find_element(By.ID, "time").get_attribute("data-seconds")) > 0.3,
             what="the time to advance")
        assert browser.execute_script("return window.stemPlayer.level()") > 1e-3
        press(browser, Keys.SPACE)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
