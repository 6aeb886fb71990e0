"""Read → decode → resize → preprocess: the one image path shared by extract and predict.

The reference is Keras' own pipeline::

    keras.utils.load_img(path, target_size=(S, S), interpolation=I)
    → keras.utils.img_to_array → keras.applications.vgg16.preprocess_input

`decode_image` reproduces ``load_img`` pixel for pixel on ordinary RGB images, and reads
right what Keras reads badly: 16-bit PNGs are scaled to 8 bits (Keras clips them to white),
EXIF orientation is applied, CMYK/palette/grey/alpha images become RGB, and a decompression
bomb is an error instead of a crash.  Pillow, NumPy and simplejpeg (libjpeg-turbo, which
decodes most JPEGs faster to the same pixels): no TensorFlow, no Ray.

`ShardImages` runs that path for a whole shard: its reader (`inputs.samples`) gives the
encoded images of the shard's files, tar members or table rows, which it decodes on a small
thread pool ahead of the model (Pillow releases the GIL while it decodes, TensorFlow while
it computes), and hands out batches of pixels, so the model never waits.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from .inputs.samples import Sample, SampleReader
    from .runner.planning import Entry
    from .storage import Storage

INTERPOLATIONS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# keras.applications.vgg16.preprocess_input ("caffe" mode): RGB → BGR, minus the ImageNet mean.
VGG16_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
PREPROCESSING = "caffe: RGB->BGR, minus ImageNet mean [103.939, 116.779, 123.68] (BGR)"


class ImageError(ValueError):
    """An input that cannot become a model input; the message is the reason we report."""


DECODERS = ("turbo", "pillow")


@dataclass(frozen=True)
class DecodeOptions:
    image_size: int = 224
    interpolation: str = "bilinear"
    # Opt-in: let libjpeg decode at a reduced scale (≥ 2× the target), much faster on photos.
    jpeg_draft: bool = False
    # JPEGs: "turbo" decodes with libjpeg-turbo through simplejpeg where it gives Pillow's
    # pixels exactly (faster; README, Performance), "pillow" with Pillow alone. Not a
    # feature setting: both give the same pixels.
    decoder: str = "turbo"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {self.interpolation!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"image size must be at least 32, not {self.image_size}")


def _to_rgb(img: Image.Image, deep: bool = False) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, scaling deep images instead of clipping them.

    `deep`: the file says its samples are 16-bit (a 16-bit PNG that an older Pillow opens
    as mode "I"), so even a dark one whose values all fit in 8 bits is scaled.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if img.mode == "I" and not deep and a.size and a.max() <= 255:
            a8 = a.astype(np.uint8)  # an 8-bit image Pillow widened
        else:
            a8 = np.round(a.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 1.0 if a.size and a.max() <= 1.0 else 255.0
        a8 = np.round(a / hi * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns converting a transparent palette straight to RGB
    return img.convert("RGB")


def decode_image(data: bytes, options: DecodeOptions) -> np.ndarray:
    """Decode encoded image bytes into an (S, S, 3) float32 RGB array with values 0–255,
    as Keras' `img_to_array` gives them. Raises ImageError (see `decode_pixels`)."""
    return decode_pixels(data, options).astype(np.float32)


def decode_pixels(data: bytes, options: DecodeOptions) -> np.ndarray:
    """Decode encoded image bytes into an (S, S, 3) uint8 RGB array: the pipeline's form,
    a quarter of float32's bytes between decoder, object store and model.

    Raises ImageError with a short reason for anything that is not a usable image:
    empty or truncated files, non-images, header-only files, decompression bombs.
    """
    if not data:
        raise ImageError("empty file")
    size = (options.image_size, options.image_size)
    kind = _signature(data)
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise ImageError(
                f"decompression bomb: {w}x{h} = {w * h} pixels is over Pillow's limit "
                f"of {Image.MAX_IMAGE_PIXELS}"
            )
        turbo = (_decode_turbo(data, img, options)
                 if options.decoder == "turbo" and img.format == "JPEG" else None)
        if turbo is not None:
            img = _oriented(turbo, img)
        else:
            if options.jpeg_draft and img.format == "JPEG":
                img.draft("RGB", (2 * size[0], 2 * size[1]))
            img.load()
            img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img, deep=kind == "PNG" and _png_bit_depth(data) == 16)
        if img.size != size:
            img = img.resize(size, INTERPOLATIONS[options.interpolation])
        return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        if kind:  # Pillow needs more than a header to identify a file
            raise ImageError(f"unreadable image: truncated {kind} (header only or cut short, "
                             f"{len(data)} bytes)") from None
        raise ImageError("not an image (unrecognised content)") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad file may raise anything from a plugin
        # (struct.error, KeyError…), and it must cost one error row, not the whole shard.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"unreadable image: {reason}") from None


def _draft_scale(w: int, h: int, options: DecodeOptions) -> int:
    """The reduction Pillow's JPEG draft mode picks for a w×h image: the largest of 8, 4, 2
    and 1 that keeps both sides at least twice the target (JpegImagePlugin.draft)."""
    if not options.jpeg_draft:
        return 1
    target = 2 * options.image_size
    scale = min(w // target, h // target)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _decode_turbo(data: bytes, img: Image.Image, options: DecodeOptions) -> Image.Image | None:
    """The pixels Pillow decodes from this JPEG, decoded by libjpeg-turbo through simplejpeg
    (several times faster on large photos: README, Performance), or None where only Pillow
    decodes it as Pillow does (CMYK, an unusual layout, a file libjpeg-turbo refuses; or no
    simplejpeg). Both run libjpeg's default DCT and upsampling, so the pixels are the same,
    draft mode included: the same reduction is asked for, and the result's size checked."""
    try:
        import simplejpeg
    except ImportError:
        return None
    if (img.mode not in ("RGB", "L") or len(getattr(img, "tile", ())) != 1
            or _arithmetic_coded(data)):
        return None
    w, h = img.size
    s = _draft_scale(w, h, options)
    size = (-(-h // s), -(-w // s))
    scaled = {"min_height": size[0], "min_width": size[1], "min_factor": s} if s > 1 else {}
    try:
        a = simplejpeg.decode_jpeg(data, "RGB" if img.mode == "RGB" else "GRAY", **scaled)
    except ValueError:  # Pillow decides, and words the error as for any other image
        return None
    if a.shape[:2] != size:
        return None
    return Image.fromarray(a if img.mode == "RGB" else a[..., 0])


def _arithmetic_coded(data: bytes) -> bool:
    """Whether the JPEG's frame is arithmetic-coded (SOF9–SOF15): libjpeg-turbo builds
    differ on those (Pillow's refuses some that simplejpeg's reads), so Pillow decides.
    Walks the marker segments up to the first scan."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return True
        if marker == 0xDA:  # start of scan: the frame header came before
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


# EXIF orientation → the transpose that undoes it, as ImageOps.exif_transpose applies it.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _oriented(pixels: Image.Image, opened: Image.Image) -> Image.Image:
    """`pixels` turned upright by the EXIF orientation of the file `opened` read."""
    method = _ORIENTATIONS.get(opened.getexif().get(ExifTags.Base.Orientation, 1))
    return pixels.transpose(method) if method is not None else pixels


# Leading bytes of the formats people put in image folders, to tell "not an image" from
# "an image cut short" when Pillow cannot identify the content.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _signature(data: bytes) -> str | None:
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's IHDR (signature 8 + length 4 + 'IHDR' 4 + w 4 + h 4)."""
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else None


def preprocess(batch: np.ndarray) -> np.ndarray:
    """keras.applications.vgg16.preprocess_input, in NumPy: RGB → BGR, minus the mean."""
    out = batch[..., ::-1].astype(np.float32, copy=True)
    out -= VGG16_MEAN_BGR
    return out


def read_file(read: Callable[[str], bytes], path: str) -> bytes:
    """Read one image file through `read` (storage). Raises ImageError for what is the
    file's fault; a store that keeps failing raises its own error (the shard is retried)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except PermissionError:
        # Not transient (Storage does not retry it): one error row, not a failed shard.
        raise ImageError("permission denied") from None


def load_image(path: str, open_file: Callable[[str], bytes], options: DecodeOptions) -> np.ndarray:
    """Read one image file through `open_file` (storage) and decode it. Raises ImageError."""
    return decode_image(read_file(open_file, path), options)


def decode_stream(samples: Iterator[Sample], options: DecodeOptions, pool: ThreadPoolExecutor,
                  lookahead: int) -> Iterator[tuple[Entry, np.ndarray | None, str | None]]:
    """Load and decode samples on `pool`, at most `lookahead` ahead, yielding them in order
    as (entry, pixels, None) or (entry, None, reason)."""
    def one(s: Sample) -> tuple[np.ndarray | None, str | None]:
        try:
            return decode_pixels(s.load(), options), None
        except ImageError as err:
            return None, str(err)

    pending: deque[tuple[Entry, Future]] = deque()
    it = iter(samples)
    for s in it:
        pending.append((s.entry, pool.submit(one, s)))
        if len(pending) >= lookahead:
            break
    while pending:
        e, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt.entry, pool.submit(one, nxt)))
        pixels, reason = fut.result()
        yield e, pixels, reason


def batched_pixels(stream: Iterator[tuple[Entry, np.ndarray | None, str | None]],
                   batch_size: int, on_error: Callable[[Entry, str], None]
                   ) -> Iterator[tuple[list[Entry], np.ndarray]]:
    """Group decoded images into batches of `batch_size`, reporting failures on the way."""
    entries: list[Entry] = []
    arrays: list[np.ndarray] = []
    for e, pixels, reason in stream:
        if pixels is None:
            on_error(e, reason or "unreadable")
            continue
        entries.append(e)
        arrays.append(pixels)
        if len(entries) == batch_size:
            yield entries, np.stack(arrays)
            entries, arrays = [], []
    if entries:
        yield entries, np.stack(arrays)


class ImageBatches(Protocol):
    """A shard's decoded images, as extract and predict read them: `ShardImages` decodes
    here, `runner.decoding.RemoteImages` on decode workers."""

    def batches(self, entries: tuple[Entry, ...], on_error: Callable[[Entry, str], None]
                ) -> Iterator[tuple[list[Entry], np.ndarray]]: ...

    def close(self) -> None: ...


class ShardImages:
    """Read → decode → batch, ahead of the model: the one image path of extract and predict.

    `reader` turns a shard's plan entries into samples (files, tar members, table rows);
    the decode thread pool and one fsspec filesystem per input protocol are reused across
    shards.
    """

    def __init__(self, storage_options: dict[str, Any], decode: DecodeOptions, batch_size: int,
                 decode_threads: int = 2, reader: SampleReader | None = None):
        from .inputs.samples import FileReader

        self.options = storage_options
        self.decode = decode
        self.batch_size = batch_size
        self.reader = reader or FileReader()
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self._stores: dict[str, Storage] = {}

    def storage_for(self, url: str) -> Storage:
        proto = url.split("://", 1)[0] if "://" in url else "file"
        if proto not in self._stores:
            from .storage import Storage

            self._stores[proto] = Storage(url, self.options)
        return self._stores[proto]

    def batches(self, entries: tuple[Entry, ...], on_error: Callable[[Entry, str], None]
                ) -> Iterator[tuple[list[Entry], np.ndarray]]:
        """(entries, (n, S, S, 3) uint8 RGB) batches, the entries being the rows
        (a tar's members, say, for a tar's entry); failures go to `on_error`."""
        if not entries:
            return iter(())
        stream = decode_stream(self.reader.samples(entries, self.storage_for), self.decode,
                               self.pool, lookahead=2 * self.batch_size)
        return batched_pixels(stream, self.batch_size, on_error)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
