"""Test audio made on the spot with ffmpeg's lavfi sources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def music(path: Path, seconds: float = 4.0, *, rate: int = 44100, channels: int = 2,
          tone: float = 440.0, volume: float = 0.3, extra: tuple[str, ...] = ()) -> Path:
    """A tone plus a quieter low tone and a little noise: enough structure for a model,
    and a dominant frequency that tests can check after decoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg(
        "-f", "lavfi", "-i", f"sine=f={tone}:d={seconds}:sample_rate={rate}",
        "-f", "lavfi", "-i", f"sine=f={tone / 4}:d={seconds}:sample_rate={rate}",
        "-f", "lavfi", "-i", f"anoisesrc=d={seconds}:a=0.05:r={rate}:seed=7",
        "-filter_complex", f"[0][1][2]amix=inputs=3:weights=1 0.5 0.2:normalize=0,volume={volume}",
        "-ac", str(channels), "-ar", str(rate), *extra, str(path),
    )
    return path


def dominant_frequency(audio: np.ndarray, rate: int) -> float:
    mono = audio.mean(axis=0)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / rate)[int(np.argmax(spectrum))])


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference - estimate) ** 2)
    signal = np.sum(reference ** 2)
    return float(10 * np.log10(signal / max(noise, 1e-20)))
