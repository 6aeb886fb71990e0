"""decode_image + preprocess against the Keras reference, and every bad-input kind."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from bottleneck.images import DecodeOptions, ImageError, decode_image, load_image, preprocess

INTERPOLATIONS = ["nearest", "bilinear", "bicubic"]


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


def keras_reference(keras, path: Path, size: int, interpolation: str) -> np.ndarray:
    """The pipeline the issue names as the reference, verbatim."""
    img = keras.utils.load_img(str(path), target_size=(size, size), interpolation=interpolation)
    x = keras.utils.img_to_array(img)
    return keras.applications.vgg16.preprocess_input(x[None])[0]


def ours(path: Path, size: int, interpolation: str) -> np.ndarray:
    return preprocess(decode_image(path.read_bytes(), DecodeOptions(size, interpolation))[None])[0]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def smooth_image(w: int, h: int) -> Image.Image:
    """Gradients and a disc: content where the resize filters differ, unlike pure noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.clip(255 * x / (w - 1), 0, 255)
    g = np.clip(255 * y / (h - 1), 0, 255)
    b = np.where((x - w / 2) ** 2 + (y - h / 3) ** 2 < (min(w, h) / 4) ** 2, 230, 20)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("parity")
    files = write_images(root / "noise", {"a": 2}, size=(40, 48), fmt="JPEG", seed=1)
    files += write_images(root / "noise", {"b": 2}, size=(61, 37), fmt="PNG", seed=2)
    for w, h in [(96, 80), (33, 50), (48, 48)]:
        img = smooth_image(w, h)
        for fmt, ext in [("JPEG", "jpg"), ("PNG", "png")]:
            p = root / f"smooth-{w}x{h}.{ext}"
            img.save(p, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            files.append(p)
    return files


# -- parity with Keras --------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("size", [32, 48])
def test_model_input_equals_the_keras_reference(keras, parity_files, interpolation, size):
    for path in parity_files:
        ref = keras_reference(keras, path, size, interpolation)
        got = ours(path, size, interpolation)
        assert got.dtype == np.float32 and got.shape == (size, size, 3)
        np.testing.assert_array_equal(got, ref, err_msg=f"{path.name} {interpolation}")


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_features_match_the_keras_reference(keras, parity_files, interpolation):
    """Parity error of the features, relative to the largest feature value (limit 2e-3)."""
    from bottleneck.model import build_conv_base, resolve_weights

    size = 48
    model = build_conv_base(resolve_weights("random"), size)
    ref = np.stack([keras_reference(keras, p, size, interpolation) for p in parity_files])
    got = np.stack([ours(p, size, interpolation) for p in parity_files])
    f_ref = np.asarray(model(ref, training=False))
    f_got = np.asarray(model(got, training=False))
    assert f_ref.shape == (len(parity_files), 1, 1, 512)
    assert np.abs(f_ref).max() > 0
    rel = float(np.abs(f_got - f_ref).max() / np.abs(f_ref).max())
    print(f"parity {interpolation}: max |ours - keras| / max |keras| = {rel:.3g}")
    assert rel <= 2e-3


def test_the_interpolations_really_differ(parity_files):
    path = next(p for p in parity_files if p.name == "smooth-96x80.png")
    outs = {i: ours(path, 32, i) for i in INTERPOLATIONS}
    assert not np.array_equal(outs["nearest"], outs["bilinear"])
    assert not np.array_equal(outs["bilinear"], outs["bicubic"])


def test_preprocess_is_caffe_bgr_minus_mean(keras):
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 4, 5, 3)).astype(np.float32)
    got = preprocess(rgb)
    np.testing.assert_array_equal(got, keras.applications.vgg16.preprocess_input(rgb.copy()))
    np.testing.assert_allclose(got[..., 0], rgb[..., 2] - 103.939, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[..., 2], rgb[..., 0] - 123.68, rtol=0, atol=1e-4)
    assert rgb[0, 0, 0, 0] == np.float32(rgb[0, 0, 0, 0])  # input left alone


def test_an_image_already_at_size_is_not_resampled():
    arr = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = decode_image(encode(Image.fromarray(arr), "PNG"), DecodeOptions(32, "bicubic"))
    np.testing.assert_array_equal(got, arr.astype(np.float32))


# -- bad inputs ---------------------------------------------------------------------------

OPTS = DecodeOptions(32, "bilinear")
PILLOW_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS


def a_jpeg() -> bytes:
    return encode(smooth_image(96, 80), "JPEG", quality=90)


def a_png() -> bytes:
    return encode(smooth_image(40, 30), "PNG")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am a text file and not a picture\n" * 5, "not an image"),
    (a_jpeg()[: len(a_jpeg()) // 2], "unreadable image"),
    (a_png()[:33], "truncated PNG"),  # signature + IHDR: a header and nothing else
    (a_png()[:60], "unreadable image"),
    (b"\x89PNG\r\n\x1a\n", "truncated PNG"),
    (b"\xff\xd8\xff\xe0", "truncated JPEG"),
    (a_jpeg()[:20], "truncated JPEG"),
    (b"GIF89a", "truncated GIF"),
], ids=["empty", "text", "truncated-jpeg", "header-only-png", "truncated-png",
        "png-signature-only", "jpeg-soi-only", "jpeg-header-only", "gif-signature-only"])
def test_bad_inputs_are_image_errors_with_a_reason(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data, OPTS)
    assert reason in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_is_an_error_not_a_crash(monkeypatch):
    data = encode(smooth_image(40, 48), "PNG")  # 1920 pixels
    # Over the limit (Pillow itself only warns up to twice the limit: we refuse).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data, OPTS)
    # Over twice the limit, where Pillow raises DecompressionBombError itself.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data, OPTS)
    # At the limit it is an ordinary image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1920)
    assert decode_image(data, OPTS).shape == (32, 32, 3)


def test_the_pixel_limit_is_restored_after_the_bomb_test():
    assert Image.MAX_IMAGE_PIXELS == PILLOW_PIXEL_LIMIT


def test_load_image_reports_missing_files_as_image_errors(tmp_path):
    def read(path: str) -> bytes:
        return Path(path).read_bytes()

    with pytest.raises(ImageError, match="file not found"):
        load_image(str(tmp_path / "nope.jpg"), read, OPTS)
    (tmp_path / "ok.png").write_bytes(a_png())
    assert load_image(str(tmp_path / "ok.png"), read, OPTS).shape == (32, 32, 3)


# -- modes → RGB --------------------------------------------------------------------------

def test_grayscale_becomes_rgb():
    g = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32x32
    got = decode_image(encode(Image.fromarray(g, "L"), "PNG"), OPTS)
    assert got.shape == (32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], g.astype(np.float32))


def test_palette_images_become_their_palette_colours():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:16] = (200, 10, 30)
    rgb[16:] = (5, 120, 250)
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert p.mode == "P"
    got = decode_image(encode(p, "PNG"), OPTS)
    np.testing.assert_array_equal(got, rgb.astype(np.float32))
    # A transparent palette (GIF-style) too.
    p.info["transparency"] = 0
    got = decode_image(encode(p, "GIF", transparency=0), OPTS)
    assert got.shape == (32, 32, 3)
    assert {tuple(v) for v in got.reshape(-1, 3).astype(int)} == {(200, 10, 30), (5, 120, 250)}


def test_rgba_drops_alpha_like_keras():
    rgba = np.random.default_rng(1).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colour is still what Keras would see
    got = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), OPTS)
    np.testing.assert_array_equal(got, rgba[..., :3].astype(np.float32))


def test_cmyk_jpeg_becomes_rgb():
    rgb = Image.fromarray(np.full((32, 32, 3), (220, 40, 60), np.uint8))
    cmyk = rgb.convert("CMYK")
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    got = decode_image(data, OPTS)
    assert got.shape == (32, 32, 3)
    np.testing.assert_allclose(got.reshape(-1, 3).mean(0), [220, 40, 60], atol=4)


def test_one_bit_images_become_black_and_white():
    bits = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    got = decode_image(encode(bits, "PNG"), OPTS)
    assert set(np.unique(got)) == {0.0, 255.0}


# -- 16-bit PNGs --------------------------------------------------------------------------

def test_16bit_grey_png_is_scaled_to_8_bits_where_keras_clips_to_white(keras, tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path, "PNG")
    assert Image.open(path).mode.startswith("I;16")

    got = decode_image(path.read_bytes(), OPTS)
    want = np.round(ramp / 257.0)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)
    assert got.max() == 255 and got.min() == 0
    # The gradient survives: 256 distinct levels, in order.
    assert len(np.unique(got)) == 256
    assert np.all(np.diff(got[..., 0].reshape(-1)) >= 0)

    # Keras clips every value over 255 to white: all but the first few pixels.
    k = keras.utils.img_to_array(keras.utils.load_img(str(path), target_size=(32, 32)))
    white = (k == 255).all(-1).mean()
    assert white > 0.99
    assert (got == 255).all(-1).mean() < 0.01


def test_a_dark_16bit_image_that_pillow_opens_as_mode_I_is_still_scaled():
    """Older Pillows open 16-bit PNGs as mode "I"; values that all fit in 8 bits must not be
    mistaken for an 8-bit image when the file says 16 bits."""
    from bottleneck.images import _to_rgb

    dark = np.full((4, 4), 200, np.int32)  # 200/65535: nearly black
    assert np.asarray(_to_rgb(Image.fromarray(dark, "I"), deep=True)).max() == 1
    # Without the file's word for it, small "I" values are an 8-bit image Pillow widened.
    assert np.asarray(_to_rgb(Image.fromarray(dark, "I"))).max() == 200


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def rgb16_png(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def test_16bit_rgb_png_is_scaled_to_8_bits():
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    got = decode_image(rgb16_png(arr), OPTS)
    assert np.abs(got - arr / 257.0).max() <= 1.0


# -- EXIF orientation ---------------------------------------------------------------------

def test_exif_orientation_is_applied():
    arr = np.zeros((48, 48, 3), np.uint8)
    arr[:16, :16] = (255, 0, 0)    # red top-left
    arr[:16, -16:] = (0, 255, 0)   # green top-right
    arr[-16:, :16] = (0, 0, 255)   # blue bottom-left
    img = Image.fromarray(arr)
    plain = encode(img, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rotated = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(rotated)).getexif()[0x0112] == 6

    opts = DecodeOptions(48, "bilinear")
    a = decode_image(plain, opts)
    b = decode_image(rotated, opts)
    # Same pixels, turned a quarter clockwise.
    np.testing.assert_array_equal(b, np.rot90(a, k=-1))
    # Red is now top-right, blue top-left.
    assert b[4, -4].argmax() == 0 and b[4, 4].argmax() == 2


def test_exif_orientation_applies_before_the_resize():
    """A tall image lying on its side is resized as it is displayed."""
    arr = np.zeros((40, 80, 3), np.uint8)  # wide as stored
    arr[:, :40] = 255                      # white left half
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "PNG", exif=exif.tobytes())
    got = decode_image(data, DecodeOptions(32, "nearest"))
    # Displayed: tall, white top half.
    assert got[:12].mean() > 250 and got[-12:].mean() < 5


# -- the libjpeg-turbo path: Pillow's pixels, faster ----------------------------------------

def turbo_cases() -> dict[str, bytes]:
    """JPEGs of every layout the turbo path takes, and one it must leave to Pillow."""
    base = smooth_image(500, 375)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the file's pixels are on their side
    return {
        "4:2:0": encode(base, "JPEG", quality=90),
        "4:4:4": encode(base, "JPEG", quality=90, subsampling=0),
        "progressive": encode(base, "JPEG", quality=85, progressive=True),
        "grey": encode(base.convert("L"), "JPEG"),
        "exif-rotated": encode(base, "JPEG", exif=exif),
        "large, odd sides": encode(base.resize((1201, 901)), "JPEG"),
        "6 MP": encode(base.resize((3000, 2000)), "JPEG"),
        "tiny": encode(base.resize((3, 5)), "JPEG"),
        "cmyk": encode(base.convert("CMYK"), "JPEG"),
    }


@pytest.mark.parametrize("draft", [False, True], ids=["full", "draft"])
@pytest.mark.parametrize("size", [32, 224])
def test_turbo_decodes_the_pixels_pillow_decodes(draft, size):
    for name, data in turbo_cases().items():
        turbo = decode_image(data, DecodeOptions(size, jpeg_draft=draft, decoder="turbo"))
        pillow = decode_image(data, DecodeOptions(size, jpeg_draft=draft, decoder="pillow"))
        assert np.array_equal(turbo, pillow), name


def test_turbo_is_taken_where_it_can_and_left_to_pillow_where_not():
    from bottleneck.images import _decode_turbo

    cases = turbo_cases()
    for draft in (False, True):
        o = DecodeOptions(224, jpeg_draft=draft)
        for name, data in cases.items():
            got = _decode_turbo(data, Image.open(io.BytesIO(data)), o)
            assert (got is None) == (name == "cmyk"), (name, draft)
    # Draft mode asks libjpeg-turbo for the reduction Pillow picks: 3000×2000 → 1/4.
    big = cases["6 MP"]
    got = _decode_turbo(big, Image.open(io.BytesIO(big)), DecodeOptions(224, jpeg_draft=True))
    assert got.size == (750, 500)


def test_arithmetic_coded_jpegs_are_left_to_pillow():
    """libjpeg-turbo builds differ on arithmetic coding (Pillow's refuses files simplejpeg's
    reads): such a frame (SOF9-SOF15) goes to Pillow, so both decoders give one answer."""
    from bottleneck.images import _arithmetic_coded, _decode_turbo

    data = turbo_cases()["4:2:0"]
    assert not _arithmetic_coded(data)
    at = data.index(b"\xff\xc0")  # the baseline frame header (SOF0)
    arith = data[:at + 1] + b"\xc9" + data[at + 2:]  # the same header, arithmetic-coded
    assert _arithmetic_coded(arith)
    assert _decode_turbo(arith, Image.open(io.BytesIO(arith)), DecodeOptions(224)) is None
