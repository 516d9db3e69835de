"""make_tiny_dataset: a Speech Commands-shaped folder of generated tones, and the split salt it suits."""

from pathlib import Path

import numpy as np
import soundfile

WORDS = {"yes": 300.0, "no": 700.0, "up": 1500.0, "down": 3000.0, "bed": 5000.0}
SPEAKERS = [f"{i:08x}" for i in range(0xA0, 0xA0 + 10)]
SALT = "tiny-1"  # with 10 speakers and 0.2/0.2 fractions this salt leaves speakers in every split


def make_tiny_dataset(root: Path) -> Path:
    """A Speech Commands-shaped folder: 5 words x 10 speakers of 1 s tones, plus background noise."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000.0
    for word, freq in WORDS.items():
        (root / word).mkdir(parents=True, exist_ok=True)
        for k, speaker in enumerate(SPEAKERS):
            f = freq * (1.0 + 0.03 * (k - 5))
            wave = 0.3 * np.sin(2 * np.pi * f * t) * np.hanning(16000) + 0.01 * rng.standard_normal(16000)
            soundfile.write(root / word / f"{speaker}_nohash_0.wav", wave.astype(np.float32), 16000, subtype="PCM_16")
    (root / "_background_noise_").mkdir(exist_ok=True)
    soundfile.write(root / "_background_noise_" / "white.wav", (0.05 * rng.standard_normal(48000)).astype(np.float32),
                    16000, subtype="PCM_16")
    return root
