"""Reading images and label maps from disk, with errors that name the file.

Three readers, one per kind of file:

- :func:`read_image`: any image Pillow decodes (PNG, JPEG, ...) as ``(H, W, 3) uint8`` RGB;
- :func:`read_label`: an 8-bit single-channel label PNG (grey or palette) as ``(H, W) uint8`` ids;
- :func:`read_synthia_label`: SYNTHIA's 16-bit multi-channel label PNGs, whose first channel is
  the class id, as ``(H, W) uint16``.

Pillow keeps only the high byte of each sample of a 16-bit colour PNG (it has no 48/64-bit
image mode), which turns SYNTHIA's class ids (< 256, so all in the low byte) into zeros. So
:func:`read_synthia_label` parses the PNG chunks itself and uses Pillow only for what it does
exactly: inflating the zlib stream and undoing the per-row PNG filters (its ``zip`` codec, in C),
once unpacking the high byte and once the low byte of every 16-bit sample. A pure numpy
decoder would be short but slow: the Average and Paeth filters are sequential along each row,
seconds per 1280 x 760 label in Python.

Every failure is a :class:`DatasetError` whose message names the file, the problem and what to do.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DatasetError", "read_image", "read_label", "read_synthia_label", "write_png_16bit"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> (Pillow mode, channels) for the types read by :func:`read_synthia_label`.
_COLOUR_TYPES = {0: ("L", 1), 2: ("RGB", 3), 6: ("RGBA", 4)}
#: Pillow mode -> raw modes unpacking the (high, low) byte of big-endian 16-bit samples.
_RAW_16BIT = {"L": ("L;16B", "L;16"), "RGB": ("RGB;16B", "RGB;16L"), "RGBA": ("RGBA;16B", "RGBA;16L")}
# What Pillow raises for files it cannot decode (truncated, corrupt, not an image, too large).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or holds unexpected values."""


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3) uint8`` RGB (grey, RGBA and palette images converted).

    The file is decoded completely here, so a truncated or corrupt file raises
    :class:`DatasetError` now rather than yielding a partly grey image. EXIF orientation is
    not applied: labels are stored in the pixel order of the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # avoids Pillow's warning for palette transparency
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except _DECODE_ERRORS as error:
        raise DatasetError(
            f"{path}: cannot decode the image ({error}); the file is truncated or corrupt, "
            f"re-extract or re-download it (or remove it from the split)"
        ) from None


def read_label(path: str | Path) -> np.ndarray:
    """The single-channel label map at ``path`` as ``(H, W) uint8`` ids.

    8-bit grey (``L``) and palette (``P``) PNGs are read as stored ids (a palette image's
    indices, not its colours). A 16-bit grey PNG is accepted when every id is below 256.
    Colour (RGB / RGBA) labels raise :class:`DatasetError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            ids = np.array(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except _DECODE_ERRORS as error:
        raise DatasetError(
            f"{path}: cannot decode the label ({error}); the file is truncated or corrupt, "
            f"re-extract or re-download it (or remove it from the split)"
        ) from None
    if mode in ("L", "P"):
        return ids.astype(np.uint8, copy=False)
    if mode.startswith("I") and ids.ndim == 2:
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise DatasetError(
                f"{path}: 16/32-bit label with ids outside 0..255 (min {ids.min()}, max {ids.max()}); "
                f"save the label ids as an 8-bit single-channel PNG"
            )
        return ids.astype(np.uint8)
    raise DatasetError(
        f"{path}: label image has mode '{mode}', but a single-channel index PNG is expected "
        f"(8-bit grey or palette, one label id per pixel); convert colour-coded labels to ids first"
    )


def read_synthia_label(path: str | Path) -> np.ndarray:
    """Class ids ``(H, W) uint16`` of a SYNTHIA ``GT/LABELS`` PNG: its first channel, read unchanged.

    Handles non-interlaced PNGs of colour type 0 (grey), 2 (RGB) and 6 (RGBA) at bit depth 8
    or 16, with any of the five row filters. Anything else raises :class:`DatasetError`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the label file ({error})") from None
    width, height, depth, colour_type, stream = _parse_png(path, data)
    mode, channels = _COLOUR_TYPES[colour_type]
    try:
        if depth == 8:
            samples = np.array(Image.frombytes(mode, (width, height), stream, "zip", mode), dtype=np.uint16)
        else:
            high_raw, low_raw = _RAW_16BIT[mode]
            high = np.array(Image.frombytes(mode, (width, height), stream, "zip", high_raw), dtype=np.uint16)
            low = np.array(Image.frombytes(mode, (width, height), stream, "zip", low_raw), dtype=np.uint16)
            samples = (high << 8) | low
    except _DECODE_ERRORS as error:
        raise DatasetError(
            f"{path}: cannot decode the PNG image data ({error}); the file is truncated or corrupt, "
            f"re-extract or re-download it"
        ) from None
    samples = samples.reshape(height, width, channels)
    return np.ascontiguousarray(samples[:, :, 0])


def _parse_png(path: Path, data: bytes) -> tuple[int, int, int, int, bytes]:
    """``(width, height, bit depth, colour type, concatenated IDAT data)`` of a PNG file's bytes."""

    def fail(problem: str) -> DatasetError:
        return DatasetError(f"{path}: {problem}; expected a SYNTHIA GT/LABELS PNG "
                            f"(re-extract the file if it is damaged)")

    if not data.startswith(_PNG_SIGNATURE):
        raise fail("not a PNG file (bad signature)")
    position = len(_PNG_SIGNATURE)
    header: tuple[int, ...] | None = None
    idat: list[bytes] = []
    while True:
        if position + 8 > len(data):
            raise fail("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 8 + length + 4
        if end > len(data):
            raise fail(f"truncated PNG (chunk {kind!r} runs past the end of the file)")
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise fail(f"corrupt PNG (CRC mismatch in chunk {kind!r})")
        if header is None and kind != b"IHDR":
            raise fail("corrupt PNG (first chunk is not IHDR)")
        if kind == b"IHDR":
            if length != 13:
                raise fail("corrupt PNG (IHDR chunk of wrong length)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        position = end
    width, height, depth, colour_type, compression, filter_method, interlace = header
    if width == 0 or height == 0:
        raise fail(f"PNG of size {width}x{height}")
    if compression != 0 or filter_method != 0:
        raise fail(f"unknown PNG compression / filter method ({compression}, {filter_method})")
    if interlace != 0:
        raise fail("interlaced PNG is not supported; re-save it without interlacing")
    if colour_type not in _COLOUR_TYPES or depth not in (8, 16):
        raise fail(f"PNG colour type {colour_type} at bit depth {depth} is not supported "
                   f"(grey, RGB or RGBA at 8 or 16 bits are)")
    if not idat:
        raise fail("PNG without image data (no IDAT chunk)")
    return width, height, depth, colour_type, b"".join(idat)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def write_png_16bit(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` ``(H, W)`` or ``(H, W, C)`` uint16, C in {1, 3, 4}, as a 16-bit PNG (filter 0).

    One channel is written as grey, three as RGB, four as RGBA: the layout of SYNTHIA's labels.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint16 or array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(f"write_png_16bit({path}): expected a non-empty (H, W) or (H, W, C) uint16 array with "
                         f"C in 1, 3, 4; got {array.dtype} of shape {array.shape}")
    height, width, channels = array.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = array.astype(">u2").view(np.uint8).reshape(height, width * channels * 2)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    png = _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    Path(path).write_bytes(png)
