#!/usr/bin/env python
"""Make a spoken-keyword data set offline with espeak-ng: train/validation/test/<keyword>/*.wav, 16 kHz mono.

    python scripts/make_keywords.py outputs/keywords_data            # 10 keywords, 1,600 clips, about a minute

Each clip is one keyword spoken by an espeak-ng *voice* (one of its English accents with one of its voice
variants: `-v en-us+f3`) at a random speed and pitch, after a random stretch of silence, with faint noise.
The variants are split between train, validation and test (seeded), so validation and test are spoken only
by voices that training never heard. Every choice comes from one seeded numpy generator, and espeak-ng itself
is deterministic, so the same arguments write the same files. A file's name says how it was made:
`<split>/<keyword>/<keyword>-<accent>+<variant>-s<speed>-p<pitch>-<n>.wav`; voices.txt lists each split's voices.
The folder is `--recipe audio-classification`'s class-folder layout (the label is the folder's name).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# espeak-ng's own English accents (its mbrola voices need mbrola, which is not installed).
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
RATE = 16000


def variants() -> list:
    """The voice variants espeak-ng has (`espeak-ng --voices=variant`: file names like !v/f3), sorted."""
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[4].split("/", 1)[1] for line in listing.splitlines()[1:] if "!v/" in line}
    return sorted(names, key=str.lower)


def split_voices(names: list, rng, shares: dict) -> dict:
    """Disjoint sets of variants per split: test and validation take their shares, train the rest."""
    order = [names[i] for i in rng.permutation(len(names))]
    out, start = {}, 0
    for split in ("test", "validation"):
        count = max(1, round(shares[split] * len(order)))
        out[split], start = sorted(order[start:start + count], key=str.lower), start + count
    out["train"] = sorted(order[start:], key=str.lower)
    return out


def speak(word: str, voice: str, speed: int, pitch: int, tmp: str):
    """One word as float32 samples at RATE (espeak-ng writes 22,050 Hz WAV)."""
    import soundfile
    import soxr

    path = os.path.join(tmp, "clip.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word],
                   check=True, capture_output=True)
    audio, rate = soundfile.read(path, dtype="float32")
    return soxr.resample(audio, rate, RATE) if rate != RATE else audio


def make_clip(word: str, voice: str, rng, tmp: str) -> tuple:
    """(samples, speed, pitch): the word at a random speed (words a minute) and pitch, random gain, after
    0-0.3 s of silence, with noise 30-50 dB under the speech."""
    import numpy as np

    speed, pitch = int(rng.integers(110, 221)), int(rng.integers(20, 81))
    audio = speak(word, voice, speed, pitch, tmp) * rng.uniform(0.3, 1.0)
    audio = np.concatenate([np.zeros(int(rng.uniform(0, 0.3) * RATE), dtype=np.float32), audio])
    level = np.sqrt(np.mean(audio ** 2)) + 1e-8
    noise = rng.standard_normal(len(audio)) * level * 10 ** (-rng.uniform(30, 50) / 20)
    return np.clip(audio + noise, -1, 1).astype(np.float32), speed, pitch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="folder to write (it must not exist, or be empty)")
    parser.add_argument("--keywords", default=",".join(KEYWORDS), help="comma-separated words (default: %(default)s)")
    parser.add_argument("--per-keyword", default="100,20,40", help="clips per keyword in train,validation,test")
    parser.add_argument("--shares", default="0.15,0.2", help="shares of the voice variants for validation,test")
    parser.add_argument("--accents", default=",".join(ACCENTS), help="espeak-ng English voices to speak with")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import numpy as np
    import soundfile

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; give a new folder", file=sys.stderr)
        return 2
    words = [w.strip() for w in args.keywords.split(",") if w.strip()]
    counts = dict(zip(("train", "validation", "test"), (int(n) for n in args.per_keyword.split(","))))
    shares = dict(zip(("validation", "test"), (float(s) for s in args.shares.split(","))))
    accents = [a.strip() for a in args.accents.split(",") if a.strip()]
    rng = np.random.default_rng(args.seed)
    pools = split_voices(variants(), rng, shares)
    lines = [f"python scripts/make_keywords.py {out} --keywords {','.join(words)} --per-keyword {args.per_keyword} "
             f"--shares {args.shares} --accents {','.join(accents)} --seed {args.seed}"]
    with tempfile.TemporaryDirectory() as tmp:
        for split, count in counts.items():
            lines.append(f"{split}: accents {', '.join(accents)}; variants {', '.join(pools[split])}")
            for word in words:
                folder = out / split / word
                folder.mkdir(parents=True, exist_ok=True)
                for n in range(count):
                    voice = f"{accents[rng.integers(len(accents))]}+{pools[split][rng.integers(len(pools[split]))]}"
                    audio, speed, pitch = make_clip(word, voice, rng, tmp)
                    soundfile.write(folder / f"{word}-{voice}-s{speed}-p{pitch}-{n:04d}.wav", audio, RATE,
                                    subtype="PCM_16")
            print(f"{split}: {count * len(words)} clips, {len(pools[split])} voice variants", flush=True)
    (out / "voices.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
