"""Draws docs/player.png: the stem player of a made-up track, in headless Chromium.

    .venv/bin/python scripts/player_screenshot.py [out.png]

Needs ffmpeg, Debian's chromium and chromium-driver, and selenium (the test extra). The
stems are generated on the spot (no music is shipped); the page is the real one, served
by `core.ops.web.build_public_app` with links signed as the bot signs them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from core.ops import player as player_page  # noqa: E402
from core.ops.web import build_public_app, start_web, stop_web  # noqa: E402
from core.storage.signed_links import LinkSigner  # noqa: E402

SECONDS = 24
# Something that looks like music in a waveform: a beat, a bass line, pads, a voice.
STEMS = {
    "vocals": "sine=f=330:d={d},volume='0.5*(0.6+0.4*sin(2*PI*t/3))*gt(mod(t,4),0.6)':eval=frame",
    "drums": "anoisesrc=d={d}:a=0.7:seed=3,volume='exp(-9*mod(t,0.25))*(0.45+0.55*lt(mod(t,1),0.25))':eval=frame",
    "bass": "sine=f=55:d={d},volume='0.7*(0.5+0.5*gt(mod(t,1),0.25))':eval=frame",
    "other": "sine=f=220:d={d},volume='0.35*(0.7+0.3*sin(2*PI*t/8))':eval=frame",
}


def make_stems(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, source in STEMS.items():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source.format(d=SECONDS),
                        "-ac", "2", "-ar", "44100", "-c:a", "libmp3lame", "-b:a", "128k", str(folder / f"{name}.mp3")],
                       check=True)


def browser(width: int, height: int):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


async def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_stems(root / "42" / "stems")
        signer = LinkSigner(b"screenshot-secret-0123456789", "http://127.0.0.1")

        async def manifest(job_id: int, expires_at: int):
            links = {f"{name}.mp3": signer.sign(f"{job_id}/{name}.mp3", expires_at) for name in STEMS}
            return player_page.manifest(title="Night Drive (demo).mp3", links=links, expires_at=expires_at,
                                        bpm=120.0, key="A minor")

        runner = await start_web(build_public_app(storage_root=root, signer=signer, player=manifest), "127.0.0.1", 0)
        host, port = runner.addresses[0][:2]
        signer.base_url = f"http://{host}:{port}"
        url = signer.sign_player(42, time.time() + 24 * 3600)
        try:
            await asyncio.to_thread(shoot, url, out)
        finally:
            await stop_web(runner)


def shoot(url: str, out: Path) -> None:
    driver = browser(1100, 960)
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                        in ("ready", "error"))
        driver.find_element(By.CSS_SELECTOR, "[data-stem='drums'] .mute").click()
        driver.execute_script("document.getElementById('seek').value = 9;"
                              "document.getElementById('seek').dispatchEvent(new Event('change'));")
        driver.execute_script("document.getElementById('loop-a').click()")
        driver.execute_script("document.getElementById('seek').value = 15;"
                              "document.getElementById('seek').dispatchEvent(new Event('change'));")
        driver.execute_script("document.getElementById('loop-b').click()")
        driver.execute_script("document.getElementById('seek').value = 11.5;"
                              "document.getElementById('seek').dispatchEvent(new Event('change'));")
        driver.execute_script("const t = document.getElementById('tempo'); t.value = 85;"
                              "t.dispatchEvent(new Event('input'));"
                              "const v = document.querySelector(\"[data-stem='other'] .volume\"); v.value = 70;"
                              "v.dispatchEvent(new Event('input')); document.activeElement.blur();")
        time.sleep(0.3)
        driver.save_screenshot(str(out))
        logs = driver.execute_script("return document.getElementById('status').textContent")
        print(logs)
    finally:
        driver.quit()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "player.png"))
