"""Decoding audio and images from what `datasets` holds undecoded ({"bytes", "path"} values, or paths): shared
by the tasks that read them and by the model card's example input. Audio goes through soundfile and soxr (no
torchaudio: see STACK.md), images through PIL; errors say what is wrong with the file, for the tasks'
unreadable-file filters to report by name."""

from __future__ import annotations

import io
import os

from pipelines.context import say
from pipelines.errors import UserError


def _source(value, what: str):
    """What to open for an undecoded value: its bytes (as a file object) if it has them, else its path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        source = io.BytesIO(data) if data else path
    else:
        source = value
    if source is None:
        raise ValueError(f"no {what} bytes and no path")
    return source


def read_audio(value, sampling_rate: int):
    """Decode one Audio(decode=False) value ({"bytes", "path"} or a path) to float32 mono at `sampling_rate`."""
    import numpy as np
    import soundfile

    source = _source(value, "audio")
    if isinstance(source, str) and not os.path.isfile(source):  # libsndfile says only "System error."
        raise FileNotFoundError("the file is missing (no such file)")
    try:
        audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as e:  # its text starts "Error opening <_io.BytesIO object at 0x...>: "
        raise ValueError(f"not a readable audio file ({e.error_string})") from None
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate != sampling_rate and len(audio):
        import soxr

        audio = soxr.resample(audio, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def problem_text(error: Exception) -> str:
    """What a task records for a file that does not decode: "unreadable: " and the error's first line."""
    return "unreadable: " + ((str(error).strip().splitlines() or [type(error).__name__])[0])[:200]


def readable_rows(task: str, split: str, problems: list, names: list, what: str, state: str = "unreadable") -> list:
    """The indices of the rows without a problem. Each other row is reported by name, one line each (from the
    cached columns, so a cached run reports them too); a split where every row has one is an error, e.g.
    "every image of the train split is unreadable" (`what` "image", `state` "unreadable")."""
    bad = [i for i, p in enumerate(problems) if p]
    for i in bad:
        say(f"{task}: {split}: skipping {names[i]}: {problems[i]}")
    if bad and len(bad) == len(problems):
        raise UserError(f"every {what} of the {split} split is {state} ({len(bad)} files; the first: "
                        f"{names[bad[0]]}: {problems[bad[0]]})")
    return [i for i, p in enumerate(problems) if not p]


def audio_name(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value
    return str(path) if path else f"example #{index} (audio bytes)"


def open_image(value):
    """An Image(decode=False) value ({"bytes", "path"}), a path, or a PIL image, as a loaded RGB PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        image = Image.open(_source(value, "image"))
        image.load()  # decode now: a truncated or garbage file fails here, not later
    return to_rgb(image)


def to_rgb(image):
    """Any PIL mode as 8-bit RGB, as a person sees the image.

    - 16-bit and 32-bit integer images (I;16, I;16B, I;16L, I) are scaled by their bit depth (65535 -> 255):
      PIL's convert("RGB") clips them instead, so a 16-bit gradient turns black and white. I;16 is 16 bits; for
      mode I (32-bit storage, often holding 8- or 16-bit data) the depth is the smallest of 8, 16 or 32 bits that
      holds its largest value; negative values are scaled by the image's own range.
    - Float images (F) are scaled from [0, 1] when their values lie there, else from their own range.
    - Transparent images (RGBA, LA, PA, P with a transparent colour) are composited on white. A transparent
      pixel's stored colour is arbitrary (often black) and convert("RGB") would expose it; image viewers, and so
      the people who labelled the images, see the image over a background, white by convention.
    - Every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, ...) goes through PIL's own conversion.
    - EXIF orientation is applied (a phone photo stored sideways is shown upright), as transformers' load_image
      does, so training sees what inference through `pipeline()` sees.
    """
    import numpy as np
    from PIL import Image, ImageOps

    if image.getexif().get(0x0112, 1) != 1:  # the EXIF Orientation tag: 1 is upright (exif_transpose would copy)
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(image), image.mode), "L").convert("RGB")
    if image.mode in ("LA", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _to_8bit(values, mode: str):
    """A high-depth single-channel array as uint8, scaled as to_rgb describes."""
    import numpy as np

    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "F":
        if 0 <= low and high <= 1:
            low, high = 0.0, 1.0
    elif low >= 0:  # integers: scale by the bit depth, so a dark image stays dark
        bits = 16 if mode.startswith("I;16") else next(b for b in (8, 16, 32) if high < 2 ** b)
        low, high = 0.0, float(2 ** bits - 1)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def image_name(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value
    return str(path) if isinstance(path, str) and path else f"example #{index} (image bytes)"
