"""Image and label file readers: conversions, SYNTHIA's 16-bit PNGs, and errors that name the file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from plca.data.io import DatasetError, read_image, read_label, read_synthia_label, write_png_16bit


# ----------------------------------------------------------------------------------------------
# An independent PNG encoder with all five row filters, written from the PNG specification
# (section 9): filtered byte = original byte - predictor(original neighbours), modulo 256.


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_row(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    x, b = row.astype(np.int32), prior.astype(np.int32)
    a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
    c = np.concatenate([np.zeros(bpp, np.int32), b[:-bpp]])
    predictor = {0: 0, 1: a, 2: b, 3: (a + b) // 2, 4: _paeth(a, b, c)}[kind]
    return ((x - predictor) % 256).astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode_png(array: np.ndarray, depth: int, filters: list[int], colour_type: int | None = None,
               interlace: int = 0) -> bytes:
    """PNG bytes of ``array`` (H, W, C) at bit ``depth`` (8 or 16), row ``i`` filtered with ``filters[i]``."""
    height, width, channels = array.shape
    colour_type = {1: 0, 3: 2, 4: 6}[channels] if colour_type is None else colour_type
    dtype = ">u2" if depth == 16 else np.uint8
    rows = array.astype(dtype).view(np.uint8).reshape(height, -1)
    bpp = channels * depth // 8
    prior = np.zeros(rows.shape[1], np.uint8)
    raw = b""
    for kind, row in zip(filters, rows):
        raw += bytes([kind]) + _filter_row(kind, row, prior, bpp).tobytes()
        prior = row
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_reference_encoder_matches_pillow(tmp_path):
    """The test encoder itself is right: Pillow decodes its 8-bit RGB output (all filters) exactly."""
    array = np.random.default_rng(0).integers(0, 256, size=(10, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(array, 8, [0, 1, 2, 3, 4] * 2))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), array)


# ----------------------------------------------------------------------------------------------
# read_image


def test_read_image_rgb_exact(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (5, 9, 3)
    np.testing.assert_array_equal(out, array)


def test_read_image_converts_grey_rgba_and_palette(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.repeat(grey[:, :, None], 3, axis=2))

    rgba = rng.integers(0, 256, size=(4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])

    indices = rng.integers(0, 4, size=(4, 6), dtype=np.uint8)
    colours = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [200, 100, 0]], np.uint8)
    image = Image.fromarray(indices)
    image.putpalette(colours.ravel().tolist())
    image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), colours[indices])


def test_read_image_jpeg(tmp_path):
    Image.fromarray(np.full((8, 12, 3), 128, np.uint8)).save(tmp_path / "a.jpg")
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 128).max() <= 2


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_read_image_truncated_names_the_file(tmp_path, suffix, fmt):
    array = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"broken{suffix}"
    Image.fromarray(array).save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="broken") as info:
        read_image(path)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_read_image_garbage_and_missing(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(DatasetError, match="not found") as info:
        read_image(tmp_path / "nowhere.png")
    assert str(tmp_path / "nowhere.png") in str(info.value)


# ----------------------------------------------------------------------------------------------
# read_label


def test_read_label_grey_and_palette_are_ids(tmp_path):
    ids = np.random.default_rng(4).integers(0, 34, size=(6, 8), dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "grey.png")
    out = read_label(tmp_path / "grey.png")
    assert out.dtype == np.uint8 and out.shape == (6, 8)
    np.testing.assert_array_equal(out, ids)

    palette_image = Image.fromarray(ids)
    palette_image.putpalette([(7 * i) % 256 for i in range(768)])  # colours unrelated to the ids
    palette_image.save(tmp_path / "palette.png")
    assert mode_of(tmp_path / "palette.png") == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "palette.png"), ids)


def test_read_label_16bit_grey(tmp_path):
    small = np.arange(12, dtype=np.uint16).reshape(3, 4) * 20
    write_png_16bit(tmp_path / "small.png", small)
    np.testing.assert_array_equal(read_label(tmp_path / "small.png"), small.astype(np.uint8))
    write_png_16bit(tmp_path / "big.png", small + 300)
    with pytest.raises(DatasetError, match="big.png"):
        read_label(tmp_path / "big.png")


def test_read_label_rejects_colour(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match="single-channel") as info:
        read_label(tmp_path / "colour.png")
    assert "colour.png" in str(info.value)


def test_read_label_truncated(tmp_path):
    ids = np.random.default_rng(5).integers(0, 256, size=(64, 64), dtype=np.uint8)
    path = tmp_path / "cut.png"
    Image.fromarray(ids).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="cut.png"):
        read_label(path)


# ----------------------------------------------------------------------------------------------
# read_synthia_label / write_png_16bit


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_write_then_read_16bit_exact(tmp_path, channels):
    array = np.random.default_rng(channels).integers(0, 65536, size=(7, 11, channels), dtype=np.uint16)
    array[0, :4, 0] = [0, 255, 256, 65535]
    write_png_16bit(tmp_path / "x.png", array)
    out = read_synthia_label(tmp_path / "x.png")
    assert out.dtype == np.uint16 and out.shape == (7, 11)
    np.testing.assert_array_equal(out, array[:, :, 0])


def test_write_png_16bit_is_a_valid_png(tmp_path):
    """Pillow decodes 16-bit grey exactly and 16-bit RGB as the high bytes: both agree with the array."""
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
    write_png_16bit(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")), grey)
    rgb = rng.integers(0, 65536, size=(5, 6, 3), dtype=np.uint16)
    write_png_16bit(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), (rgb >> 8).astype(np.uint8))


def test_write_png_16bit_rejects_other_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_png_16bit(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint16"):
        write_png_16bit(tmp_path / "x.png", np.zeros((4, 4, 2), np.uint16))


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_read_synthia_label_all_filters(tmp_path, depth, channels):
    """Every row filter (None, Sub, Up, Average, Paeth), in fixed and random order, decodes exactly."""
    rng = np.random.default_rng(depth * 10 + channels)
    height = 23
    array = rng.integers(0, 2**depth, size=(height, 13, channels)).astype(np.uint16)
    array[5:12, 2:9] = array[5, 2]  # flat regions, as in label maps
    for filters in ([0, 1, 2, 3, 4] * 5, rng.integers(0, 5, size=height).tolist()):
        path = tmp_path / "x.png"
        path.write_bytes(encode_png(array, depth, filters[:height]))
        np.testing.assert_array_equal(read_synthia_label(path), array[:, :, 0])


def test_synthia_label_is_not_cut_to_8_bits(tmp_path):
    """Ids above 255 in the first channel survive: Pillow alone would keep only the high byte."""
    label = np.zeros((2, 3, 3), np.uint16)
    label[:, :, 0] = [[3, 259, 512], [8, 1000, 65535]]
    label[:, :, 1] = 4000
    write_png_16bit(tmp_path / "x.png", label)
    np.testing.assert_array_equal(read_synthia_label(tmp_path / "x.png"), label[:, :, 0])


def _corrupt_png_errors(tmp_path):
    array = np.random.default_rng(7).integers(0, 65536, size=(16, 16, 3), dtype=np.uint16)
    good = encode_png(array, 16, [4] * 16)
    crc_position = 8 + 8 + 13  # signature, IHDR length + type, IHDR body: the IHDR CRC follows
    yield "crc", good[:crc_position] + bytes([good[crc_position] ^ 1]) + good[crc_position + 1:], "CRC"
    yield "truncated", good[: len(good) // 2], "truncated"
    yield "interlaced", encode_png(array, 16, [0] * 16, interlace=1), "interlaced"
    yield "palette", encode_png(array[:, :, :1].astype(np.uint8), 8, [0] * 16, colour_type=3), "colour type 3"
    yield "grey_alpha", encode_png(array[:, :, :2], 16, [0] * 16, colour_type=4), "colour type 4"
    yield "not_png", b"GIF89a" + b"\0" * 20, "not a PNG"
    short = zlib.compress(b"\0" * 10)  # image data far too short for 16 x 16 pixels
    header = struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0)
    yield "short_data", (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", short)
                         + _chunk(b"IEND", b"")), "truncated or corrupt"


def test_read_synthia_label_errors_name_the_file(tmp_path):
    for name, data, problem in _corrupt_png_errors(tmp_path):
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        with pytest.raises(DatasetError, match=problem) as info:
            read_synthia_label(path)
        assert str(path) in str(info.value), name
    with pytest.raises(DatasetError, match="not found"):
        read_synthia_label(tmp_path / "missing.png")


# ----------------------------------------------------------------------------------------------
# read_image: every mode Pillow writes, converted to 8-bit RGB (or refused by name)


def mode_of(path) -> str:
    with Image.open(path) as image:
        return image.mode


def test_read_image_16bit_grey_is_scaled_by_its_bit_depth(tmp_path):
    """A 16-bit grey PNG (Pillow mode I;16): v -> round(v * 255 / 65535), not clipped to white."""
    values = np.array([[0, 128, 257, 32767], [32768, 40000, 65280, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert mode_of(tmp_path / "grey16.png") == "I;16"
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert expected[1, 3] == 255 and expected[0, 2] == 1
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"), np.repeat(expected[:, :, None], 3, axis=2))


def test_read_image_32bit_integer_grey(tmp_path):
    """Mode I holding 16-bit values is scaled like I;16; values beyond 16 bits are refused by name."""
    values = np.array([[0, 257, 65535]], np.int32)
    Image.fromarray(values).save(tmp_path / "int.tif")
    assert mode_of(tmp_path / "int.tif") == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "int.tif")[0, :, 0], [0, 1, 255])
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DatasetError, match="mode 'I'") as info:
        read_image(tmp_path / "wide.tif")
    assert str(tmp_path / "wide.tif") in str(info.value) and "\n" not in str(info.value)


def test_read_image_1bit(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert mode_of(tmp_path / "bits.png") == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "bits.png")[:, :, 1], bits.astype(np.uint8) * 255)


def test_read_image_grey_alpha_drops_the_alpha(tmp_path):
    rng = np.random.default_rng(8)
    grey_alpha = rng.integers(0, 256, size=(3, 5, 2), dtype=np.uint8)
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    assert mode_of(tmp_path / "la.png") == "LA"
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.repeat(grey_alpha[:, :, :1], 3, axis=2))


def test_read_image_palette_with_transparency_keeps_the_palette_colours(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    colours = np.array([[10, 20, 30], [40, 50, 60], [200, 100, 0]], np.uint8)
    image = Image.fromarray(indices, mode="L").convert("P")
    image.putpalette(colours.ravel().tolist())
    image.save(tmp_path / "p.png", transparency=1)  # index 1 transparent: its colour is kept (alpha dropped)
    with Image.open(tmp_path / "p.png") as stored:
        assert stored.mode == "P" and "transparency" in stored.info
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), colours[indices])


def test_read_image_rgba_with_transparent_pixels_keeps_their_colour(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 128], [0, 0, 255, 255]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])


def test_read_image_cmyk(tmp_path):
    """CMYK (TIFF, lossless) through Pillow's conversion: pure inks give the expected colours."""
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 255, 255, 0],
                      [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    assert mode_of(tmp_path / "cmyk.tif") == "CMYK"
    expected = [[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [255, 0, 0], [0, 0, 0]]
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tif")[0], expected)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(read_image(tmp_path / "cmyk.jpg")[0].astype(int) - expected).max() <= 40  # lossy, same colours


def test_read_image_refuses_float_images_by_name(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"mode 'F' \(32-bit floating point\)") as info:
        read_image(tmp_path / "float.tif")
    assert str(tmp_path / "float.tif") in str(info.value)


def test_image_mode_problem():
    from plca.data.io import image_mode_problem

    for mode in ("RGB", "RGBA", "L", "LA", "1", "P", "CMYK", "I;16", "I"):
        assert image_mode_problem(mode) is None, mode
    assert "'F'" in image_mode_problem("F") and "'LAB'" in image_mode_problem("LAB")


def test_read_label_1bit_is_ids_0_and_1(tmp_path):
    bits = np.array([[True, False], [False, True]])
    Image.fromarray(bits).save(tmp_path / "mask.png")
    out = read_label(tmp_path / "mask.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, bits.astype(np.uint8))


def test_png_header(tmp_path):
    from plca.data.io import png_header

    write_png_16bit(tmp_path / "x.png", np.zeros((3, 5, 3), np.uint16))
    assert png_header(tmp_path / "x.png") == (5, 3, 16, 2)
    Image.fromarray(np.zeros((4, 2), np.uint8)).save(tmp_path / "y.png")
    assert png_header(tmp_path / "y.png") == (2, 4, 8, 0)
    Image.fromarray(np.zeros((4, 2, 3), np.uint8)).save(tmp_path / "z.jpg")
    assert png_header(tmp_path / "z.jpg") is None


# ----------------------------------------------------------------------------------------------
# Split files


def test_read_split_file_bom_line_endings_spaces_comments_suffixes(tmp_path):
    from plca.data.io import read_split_file

    path = tmp_path / "train.txt"
    path.write_bytes(b"\xef\xbb\xbf# header\r\n  a \r\n\tb.png\t\r\n\r\nc.JPG  # note\r\nd e\rf\n")
    assert read_split_file(path) == ["a", "b", "c", "d e", "f"]


def test_read_split_file_duplicates_are_kept_for_the_caller(tmp_path):
    from plca.data.io import duplicate_names, read_split_file

    (tmp_path / "s.txt").write_text("b\na\nb\nc\na.png\n")
    names = read_split_file(tmp_path / "s.txt")
    assert names == ["b", "a", "b", "c", "a"] and duplicate_names(names) == ["a", "b"]


def test_read_split_file_not_utf8_names_the_line_and_byte(tmp_path):
    from plca.data.io import read_split_file

    path = tmp_path / "val.txt"
    path.write_bytes(b"first\nsecond\ncaf\xe9\n")  # Latin-1 e acute at byte 16, line 3
    with pytest.raises(DatasetError) as info:
        read_split_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3 (byte offset 16") and "not UTF-8" in message and "\n" not in message
    path.write_bytes(b"\xef\xbb\xbfok\n\xff\n")  # the offset counts the byte-order mark
    with pytest.raises(DatasetError, match=r"line 2 \(byte offset 6"):
        read_split_file(path)
    path.write_bytes("a\nb\n".encode("utf-16"))
    with pytest.raises(DatasetError, match="UTF-16"):
        read_split_file(path)
    with pytest.raises(DatasetError, match="not found"):
        read_split_file(tmp_path / "missing.txt")
