"""Images -> the digits model's input: 8x8 grayscale, ink high, values 0..16.

sklearn's digits were made from 32x32 black-and-white scans by counting the ink pixels in
each 4x4 block, so each of the 64 features is 0 (blank) to 16 (all ink). An image file is
brought to that scale the same way:

1. decoded to grayscale in [0, 1] (luminance; transparent pixels count as white paper);
2. inverted when its background is light (the border pixels' mean is above 0.5), so that
   ink is high, as in the dataset;
3. contrast-stretched to [0, 1] (a grey pencil stroke on off-white paper becomes full ink
   on blank);
4. resized to 8x8 by area averaging (each output cell is the mean of the input area it
   covers, fractional pixels weighted), which for a 32x32 binary image is exactly the
   dataset's block count divided by 16;
5. multiplied by 16 and rounded to integers, as in the dataset.

Readers: PGM/PPM (P2, P3, P5, P6), PNG (8-bit, non-interlaced: grey, grey+alpha, RGB,
RGBA, palette), .npy (any 2-D array, or 64 values taken as already on the 0..16 scale).
Other formats (JPEG...) are read with Pillow when it is installed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIDE = 8
INK = 16.0


class ImageError(ValueError):
    """The file cannot be read as an image."""


# -- readers ---------------------------------------------------------------------------------
def _pnm(data: bytes) -> np.ndarray:
    magic = data[:2]
    if magic not in (b"P2", b"P3", b"P5", b"P6"):
        raise ImageError(f"unsupported PNM type {magic!r}")
    tokens: list[bytes] = []
    pos = 2
    while len(tokens) < 3:  # width, height, maxval; comments start with '#'
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    width, height, maxval = (int(t) for t in tokens)
    channels = 3 if magic in (b"P3", b"P6") else 1
    count = width * height * channels
    if magic in (b"P2", b"P3"):
        values = np.array(data[pos:].split()[:count], dtype=np.float64)
    else:
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        start = pos + 1  # exactly one whitespace byte after maxval
        values = np.frombuffer(data, dtype=dtype, count=count, offset=start).astype(np.float64)
    if values.size != count:
        raise ImageError(f"truncated PNM: {values.size} of {count} values")
    image = values.reshape(height, width, channels) / maxval
    return _gray(image)


def _png(data: bytes) -> np.ndarray:
    pos, chunks, palette, transparency = 8, [], None, None
    width = height = depth = color = interlace = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            transparency = np.frombuffer(body, dtype=np.uint8)
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if depth != 8 or interlace or channels is None:
        raise ImageError(f"unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace}); "
                         "save it as 8-bit non-interlaced PNG, or install Pillow")
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.int32)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):  # undo the per-row filters
        start = y * (stride + 1)
        kind = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1).astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + previous) & 0xFF
        else:
            row = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                left = row[i - channels] if i >= channels else 0
                up = previous[i]
                if kind == 1:
                    row[i] = (line[i] + left) & 0xFF
                elif kind == 3:
                    row[i] = (line[i] + (left + up) // 2) & 0xFF
                elif kind == 4:
                    up_left = previous[i - channels] if i >= channels else 0
                    p = left + up - up_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                    row[i] = (line[i] + pred) & 0xFF
                else:
                    raise ImageError(f"bad PNG filter type {kind}")
        out[y] = row
        previous = row
    pixels = out.reshape(height, width, channels).astype(np.float64)
    if color == 3:
        if palette is None:
            raise ImageError("palette PNG without a palette")
        index = pixels[..., 0].astype(np.intp)
        rgb = palette[index].astype(np.float64)
        if transparency is not None:
            alpha = np.full(len(palette), 255, dtype=np.float64)
            alpha[:len(transparency)] = transparency
            rgb = np.concatenate([rgb, alpha[index][..., None]], axis=-1)
        pixels = rgb
    return _gray(pixels / 255.0)


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W) luminance; alpha composited over white."""
    channels = image.shape[-1]
    alpha = None
    if channels in (2, 4):
        alpha, image = image[..., -1], image[..., :-1]
    gray = image[..., 0] if image.shape[-1] == 1 else image @ np.array([0.299, 0.587, 0.114])
    if alpha is not None:
        gray = gray * alpha + (1.0 - alpha)
    return gray


def _pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ImageError(f"{path.name}: only PNG, PGM/PPM and .npy can be read without Pillow "
                         "(pip install pillow for JPEG and others)") from None
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def read_gray(path: Path) -> np.ndarray:
    """The image at `path` as a (H, W) float array in [0, 1]."""
    data = Path(path).read_bytes()
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data)
    if data[:1] == b"P" and data[1:2] in b"2356":
        return _pnm(data)
    return _pillow(Path(path))


# -- conversion ------------------------------------------------------------------------------
def _area_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) weights averaging each output cell's share of the input pixels."""
    edges = np.linspace(0.0, size, out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def to_digit_scale(gray: np.ndarray) -> np.ndarray:
    """(H, W) grayscale in [0, 1] -> 64 float32 values on the digits' 0..16 ink scale."""
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"need a 2-D image, got shape {list(gray.shape)}")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:
        gray = 1.0 - gray  # dark ink on light paper -> ink high
    low, high = gray.min(), gray.max()
    gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    small = _area_matrix(gray.shape[0], SIDE) @ gray @ _area_matrix(gray.shape[1], SIDE).T
    return np.rint(small * INK).astype(np.float32).reshape(-1)


def load_pixels(path: Path) -> np.ndarray:
    """64 float32 values for the image or .npy file at `path`."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.size == SIDE * SIDE:
            return np.asarray(array, dtype=np.float32).reshape(-1)  # already the model's scale
        if array.ndim != 2:
            raise ImageError(f"{path.name}: need 64 values or a 2-D image, got shape {list(array.shape)}")
        array = array.astype(np.float64)
        peak = array.max()
        return to_digit_scale(array / peak if peak > 1 else array)
    return to_digit_scale(read_gray(path))
