"""Reading images, label maps and split files from disk, with errors that name the file.

One reader per kind of file:

- :func:`read_image`: any image Pillow decodes (PNG, JPEG, TIFF, ...) as ``(H, W, 3) uint8`` RGB,
  whatever its mode (see :func:`read_image` for each mode's conversion; modes without a faithful
  8-bit RGB conversion are refused by name);
- :func:`read_label`: an 8-bit single-channel label PNG (grey, palette or 1-bit) as ``(H, W) uint8`` ids;
- :func:`read_synthia_label`: SYNTHIA's 16-bit multi-channel label PNGs, whose first channel is
  the class id, as ``(H, W) uint16``;
- :func:`read_split_file`: the sample names listed in a split file (UTF-8 text, one per line).

Pillow keeps only the high byte of each sample of a 16-bit colour PNG (it has no 48/64-bit
image mode), which turns SYNTHIA's class ids (< 256, so all in the low byte) into zeros. So
:func:`read_synthia_label` parses the PNG chunks itself and uses Pillow only for what it does
exactly: inflating the zlib stream and undoing the per-row PNG filters (its ``zip`` codec, in C),
once unpacking the high byte and once the low byte of every 16-bit sample. A pure numpy
decoder would be short but slow: the Average and Paeth filters are sequential along each row,
seconds per 1280 x 760 label in Python.

Every failure is a :class:`DatasetError` whose message names the file, the problem and what to do;
a problem that does not stop a reader (the layout checks of :mod:`plca.data.datasets` and
:mod:`plca.data.checks`) is recorded as a :class:`Finding`.
"""

from __future__ import annotations

import codecs
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DatasetError", "Finding", "IMAGE_SUFFIXES", "ImageModeError", "duplicate_names", "image_mode_problem",
    "png_header", "read_image", "read_label", "read_split_file", "read_synthia_label", "read_text_lines",
    "write_png_16bit",
]

#: Image file suffixes a split file's names may carry (dropped) and the folder format looks for.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> (Pillow mode, channels) for the types read by :func:`read_synthia_label`.
_COLOUR_TYPES = {0: ("L", 1), 2: ("RGB", 3), 6: ("RGBA", 4)}
#: Pillow mode -> raw modes unpacking the (high, low) byte of big-endian 16-bit samples.
_RAW_16BIT = {"L": ("L;16B", "L;16"), "RGB": ("RGB;16B", "RGB;16L"), "RGBA": ("RGBA;16B", "RGBA;16L")}


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for files it cannot decode (truncated, corrupt, not an image, too large).

    Pillow is imported by the readers, not with the module: the dataset formats (and the config checks
    that list them) load on the core install too, where ``plca.load_model`` checks a stored config."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError


#: Image modes :func:`read_image` converts, and how (the others are refused by name).
_IMAGE_MODES = {
    "RGB": "as stored",
    "RGBA": "alpha dropped", "RGBX": "padding channel dropped",
    "L": "grey repeated to 3 channels", "LA": "alpha dropped, grey repeated",
    "1": "1-bit: 0 -> 0, 1 -> 255",
    "P": "through its palette (alpha dropped)", "PA": "through its palette (alpha dropped)",
    "CMYK": "Pillow's CMYK -> RGB conversion", "YCbCr": "Pillow's YCbCr -> RGB conversion",
    "I;16": "16-bit grey scaled to 8 bits (65535 -> 255)", "I;16B": "16-bit grey scaled to 8 bits",
    "I;16L": "16-bit grey scaled to 8 bits", "I;16N": "16-bit grey scaled to 8 bits",
    "I": "32-bit integer grey holding 16-bit values (0..65535), scaled to 8 bits",
}
_REFUSED_MODES = {"F": "32-bit floating point", "LAB": "CIELab colour", "HSV": "HSV colour",
                  "I;16S": "signed 16-bit", "La": "premultiplied alpha", "RGBa": "premultiplied alpha"}
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or holds unexpected values."""


class ImageModeError(DatasetError):
    """An image whose mode (e.g. 32-bit float) has no faithful 8-bit RGB conversion."""


@dataclass
class Finding:
    """One kind of problem (or remark) about a dataset, and the files or names that have it."""

    level: str  # "error" | "warning" | "note"
    message: str
    items: list[str] = field(default_factory=list)


def image_mode_problem(mode: str) -> str | None:
    """Why an image of Pillow ``mode`` cannot be read as 8-bit RGB, or None if :func:`read_image` converts it."""
    if mode in _IMAGE_MODES:
        return None
    what = _REFUSED_MODES.get(mode, "an unusual mode")
    return (f"image mode '{mode}' ({what}) has no faithful 8-bit RGB conversion; save the image as 8-bit RGB "
            f"(PNG or JPEG)")


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3) uint8`` RGB.

    Conversions by Pillow mode: ``RGB`` as stored; ``L`` grey repeated to three channels; ``1``
    (1-bit) 0 / 255; ``P`` through its palette; ``RGBA``, ``LA``, ``PA``: the alpha channel is
    dropped (the stored colour is kept, not composited on any background); ``CMYK`` and ``YCbCr``
    by Pillow's conversion; 16-bit grey (``I;16*``, and ``I`` whose values fit in 16 bits) scaled
    by its bit depth, ``round(v * 255 / 65535)``. 16-bit RGB(A) PNGs arrive from Pillow as 8-bit
    (their high bytes). Any other mode (``F``, ``LAB``, ``I`` beyond 16 bits, ...) raises
    :class:`DatasetError` naming the file and the mode.

    The file is decoded completely here, so a truncated or corrupt file raises
    :class:`DatasetError` now rather than yielding a partly grey image. EXIF orientation is
    not applied: labels are stored in the pixel order of the file.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as image:
            problem = image_mode_problem(image.mode)
            if problem is not None:
                raise ImageModeError(f"{path}: {problem}")
            image.load()
            rgb = _to_rgb(image, path)
            return rgb if rgb.flags.writeable else rgb.copy()  # torch wants writable arrays
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except _decode_errors() as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(
            f"{path}: cannot decode the image ({error}); the file is truncated or corrupt, "
            f"re-extract or re-download it (or remove it from the split)"
        ) from None


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """``(H, W, 3) uint8`` of a loaded image whose mode is one of :data:`_IMAGE_MODES`."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[:, :, :3])
    if mode in ("P", "PA"):
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, :3])
    if mode in ("CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    values = np.asarray(image)
    if mode == "LA":
        grey = values[:, :, 0]
    elif mode == "L":
        grey = values
    elif mode == "1":
        grey = values.astype(np.uint8) * 255
    else:  # 16-bit grey, or "I" holding 16-bit values
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise ImageModeError(f"{path}: image mode '{mode}' with values {int(values.min())}..{int(values.max())}, "
                               f"beyond 16 bits: there is no faithful 8-bit RGB conversion; save the image as "
                               f"8-bit RGB (PNG or JPEG)")
        grey = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey.astype(np.uint8, copy=False)[:, :, None], 3, axis=2)


def read_label(path: str | Path) -> np.ndarray:
    """The single-channel label map at ``path`` as ``(H, W) uint8`` ids.

    8-bit grey (``L``) and palette (``P``) PNGs are read as stored ids (a palette image's
    indices, not its colours); a 1-bit image as ids 0 and 1. A 16-bit grey PNG is accepted
    when every id is below 256. Colour (RGB / RGBA) labels raise :class:`DatasetError`.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            ids = np.array(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except _decode_errors() as error:
        raise DatasetError(
            f"{path}: cannot decode the label ({error}); the file is truncated or corrupt, "
            f"re-extract or re-download it (or remove it from the split)"
        ) from None
    if mode in ("L", "P", "1"):
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


def png_header(path: str | Path) -> tuple[int, int, int, int] | None:
    """``(width, height, bit depth, colour type)`` from a PNG's IHDR chunk; None if the file is not a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24], head[25]


def read_text_lines(path: str | Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line of the UTF-8 text file ``path``, stripped of spaces.

    A UTF-8 byte-order mark is skipped and Windows / old Mac line endings are accepted; ``#``
    starts a comment that runs to the end of the line. A file that is not UTF-8 raises a one-line
    :class:`DatasetError` naming the file, the line and the byte offset of the first bad byte.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error})") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data.count(b"\n", 0, offset) + 1
        utf16 = " (it looks like UTF-16)" if data.startswith(_UTF16_BOMS) else ""
        raise DatasetError(f"{path}: line {line} (byte offset {offset}, byte 0x{data[offset]:02x}) is not UTF-8 "
                           f"text{utf16}; save the file as UTF-8") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append((number, line))
    return lines


def read_split_file(path: str | Path) -> list[str]:
    """The sample names a split file lists, in file order: one per line (see :func:`read_text_lines`).

    An image suffix (``.png``, ``.jpg``, ``.jpeg``) on a name is dropped, so lists of file names
    work too. Duplicates are kept: the caller reports them (:func:`duplicate_names`).
    """
    names = []
    for _, name in read_text_lines(path):
        if name.lower().endswith(IMAGE_SUFFIXES):
            name = name.rsplit(".", 1)[0]
        names.append(name)
    return names


def duplicate_names(names: list[str]) -> list[str]:
    """The names listed more than once, sorted."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


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
    from PIL import Image

    try:
        if depth == 8:
            samples = np.array(Image.frombytes(mode, (width, height), stream, "zip", mode), dtype=np.uint16)
        else:
            high_raw, low_raw = _RAW_16BIT[mode]
            high = np.array(Image.frombytes(mode, (width, height), stream, "zip", high_raw), dtype=np.uint16)
            low = np.array(Image.frombytes(mode, (width, height), stream, "zip", low_raw), dtype=np.uint16)
            samples = (high << 8) | low
    except _decode_errors() as error:
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
