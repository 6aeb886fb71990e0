"""WebDataset tars as INPUT: planning by tar, and reading a tar's samples, whole or damaged.

The tars are real ones written by Python's `tarfile` in img2dataset's layout (through
`bottleneck.tools.formats`), holding small real JPEGs and PNGs of seeded noise. Damage is
done to the bytes on disk, the way a cut download or a bad disk leaves a tar. No Ray and no
TensorFlow: `ShardImages` only decodes here.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from s3fixtures import S3Bucket, s3, s3_server  # noqa: F401 - fixtures

from bottleneck.errors import UsageError
from bottleneck.images import DecodeOptions, ImageError, ShardImages, decode_image
from bottleneck.inputs import InputOptions, open_source
from bottleneck.inputs.samples import Sample
from bottleneck.inputs.source import PAGE_SCHEMA, START, Position
from bottleneck.inputs.webdataset import TAR_BLOCK, TarReader, WebDatasetSource, read_tar
from bottleneck.runner.planning import Entry, url_path
from bottleneck.storage import Storage
from bottleneck.tools.formats import Photo, classes, tar_member, write_loose, write_tars

SIZE = 32  # decoded size: the fixtures' own size, so pixels are compared without a resize


def encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def photos(n: int, seed: int = 0, side: int = SIZE, png: bool = False) -> list[Photo]:
    """n distinct noise photos, two classes, each with a caption: a PNG then two JPEGs in
    turn, or all PNGs (noise does not compress: side² × 3 bytes each)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ext = "jpg" if i % 3 and not png else "png"
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        data = encode(img, "JPEG" if ext == "jpg" else "PNG", compress_level=1)
        out.append(Photo(f"{seed:04d}{i:05d}", data, ("cat", "dog")[i % 2], ext,
                         caption=f"photo {i} of seed {seed}"))
    return out


def make_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> str:
    """A tar of exactly these members, in this order, as img2dataset's writer makes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar_member(tar, name, data)
    return str(path)


def headers(path: str | Path) -> dict[str, tarfile.TarInfo]:
    """A tar's members by name (the last of a name that repeats)."""
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def header_offsets(path: str | Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def outcome(s: Sample) -> bytes | str:
    """A sample's bytes, or its error as "ERROR: reason"."""
    try:
        return s.load()
    except ImageError as e:
        return f"ERROR: {e}"


def rows(samples: Iterable[Sample]) -> list[tuple[str, str | None, bytes | str]]:
    return [(s.entry.url, s.entry.label, outcome(s)) for s in samples]


def local(url: str) -> Storage:
    return Storage(url, {})


def tar_rows(url: str, label_field: str | None = None, storage_for=local):
    """What a worker reads from one tar entry of the plan."""
    entry = Entry(url_path(url), url, None)
    return rows(TarReader(label_field).samples((entry,), storage_for))


def intact(url: str, ps: list[Photo]) -> list[tuple[str, str | None, bytes | str]]:
    """The rows of these photos read whole from `url`, labelled by KEY.cls."""
    index = {c: str(i) for i, c in enumerate(classes(ps))}
    return [(f"{url}#{p.key}", index[p.label], p.data) for p in ps]


@pytest.fixture
def one_tar(tmp_path) -> tuple[str, list[Photo]]:
    ps = photos(6)
    (path,) = write_tars(ps, tmp_path / "tars", tars=1)
    return str(path), ps


# -- reading one tar ------------------------------------------------------------------------

def test_whole_tar_gives_every_sample_once_in_member_order(one_tar):
    url, ps = one_tar
    # Labels: the class index in KEY.cls by default, the named field of KEY.json on request.
    assert tar_rows(url) == intact(url, ps)
    assert tar_rows(url, "label") == [(f"{url}#{p.key}", p.label, p.data) for p in ps]
    assert tar_rows(url, "no_such_field") == [(f"{url}#{p.key}", None, p.data) for p in ps]


CUTS = {
    # where the file ends → what the cut sample's reason says
    "inside a JPEG's data": (lambda m, k: m[f"{k}.jpg"].offset_data + 300,
                             "tar cut short inside '{k}.jpg'"),
    "inside a caption's data": (lambda m, k: m[f"{k}.txt"].offset_data + 3,
                                "tar cut short after '{k}.txt'"),
    "inside a header": (lambda m, k: m[f"{k}.txt"].offset + 100,
                        "tar cut short inside the header at byte {txt}"),
    "at a member boundary": (lambda m, k: m[f"{k}.txt"].offset,
                             "tar cut short after '{k}.jpg': no end-of-archive marker"),
}


@pytest.mark.parametrize("where", CUTS)
def test_tar_cut_short_keeps_what_came_before_and_reports_the_cut_once(one_tar, where):
    url, ps = one_tar
    cut_at, reason = CUTS[where]
    k = 4  # a JPEG (photos() makes every third a PNG)
    m, key = headers(url), ps[k].key
    Path(url).write_bytes(Path(url).read_bytes()[:cut_at(m, key)])
    got = tar_rows(url)
    assert got[:k] == intact(url, ps[:k])
    assert len(got) == k + 1, "nothing after the cut"
    name, _, error = got[k]
    assert name == f"{url}#{key}"
    assert error.startswith("ERROR: " + reason.format(k=key, txt=m[f"{key}.txt"].offset))
    assert error.endswith("this sample and the rest of the tar are lost")


def test_whole_sample_before_the_damage_is_kept_and_the_loss_named_by_the_tar(one_tar):
    # Cut after sample k's last member (its label is in): sample k is whole, and what is
    # lost (whatever followed) is one row named by the tar, not by a sample that was read.
    url, ps = one_tar
    k = 4
    m = headers(url)
    Path(url).write_bytes(Path(url).read_bytes()[:m[f"{ps[k + 1].key}.jpg"].offset])
    got = tar_rows(url)
    assert got[:k + 1] == intact(url, ps[:k + 1])
    assert len(got) == k + 2
    name, label, error = got[k + 1]
    assert (name, label) == (url, None)
    assert error.startswith(f"ERROR: tar cut short after '{ps[k].key}.cls'")
    assert error.endswith("the rest of the tar is lost")


@pytest.mark.parametrize("damage", ["garbage", "zeros"])
def test_broken_header_keeps_earlier_samples_and_names_what_is_lost(one_tar, damage):
    url, ps = one_tar
    k = 2
    at = headers(url)[f"{ps[k].key}.json"].offset
    data = bytearray(Path(url).read_bytes())
    # Garbage fails the header's checksum; zeros look like the end-of-archive marker, which
    # tarfile takes for the end of the tar without a word.
    data[at:at + 512] = b"#" * 512 if damage == "garbage" else bytes(512)
    Path(url).write_bytes(bytes(data))
    got = tar_rows(url)
    assert got[:k] == intact(url, ps[:k])
    assert len(got) == k + 1
    name, _, error = got[k]
    assert name == f"{url}#{ps[k].key}"
    assert f"broken tar header{' (all zeros)' if damage == 'zeros' else ''} at byte {at}" \
        in error
    assert error.endswith("this sample and the rest of the tar are lost")


def test_end_of_archive_padding_is_not_a_broken_header(tmp_path):
    # tarfile pads a tar to 10 KiB records with zeros: a long zero tail, but no data in it.
    ps = photos(1)
    url = make_tar(tmp_path / "a.tar", [(f"{ps[0].key}.jpg", ps[0].data)])
    assert Path(url).stat().st_size % tarfile.RECORDSIZE == 0
    assert tar_rows(url) == [(f"{url}#{ps[0].key}", None, ps[0].data)]


def test_sample_without_an_image_is_one_error(tmp_path):
    a, c = photos(2)
    url = make_tar(tmp_path / "a.tar", [
        (f"{a.key}.jpg", a.data), (f"{a.key}.txt", b"a"),
        ("nimg.txt", b"caption only"), ("nimg.json", b'{"label": "cat"}'),
        (f"{c.key}.png", c.data)])
    assert tar_rows(url, "label") == [
        (f"{url}#{a.key}", None, a.data),
        (f"{url}#nimg", "cat", "ERROR: no image in sample (members: json, txt)"),
        (f"{url}#{c.key}", None, c.data)]


def test_duplicate_keys_keep_the_first_sample(tmp_path):
    a, b, a2, c, c2 = photos(5)
    url = make_tar(tmp_path / "a.tar", [
        ("a.jpg", a.data), ("a.cls", b"0"), ("b.jpg", b.data), ("b.cls", b"1"),
        ("a.jpg", a2.data), ("a.cls", b"2"),  # the same key again, later
        ("c.jpg", c.data), ("c.jpg", c2.data), ("c.cls", b"3")])  # a member twice in a row
    at = header_offsets(url)
    got = tar_rows(url)
    # Each duplicate's error row is named apart (`@BYTE`) from the row that is kept.
    assert [(n, out) for n, _, out in got] == [
        (f"{url}#a", a.data), (f"{url}#b", b.data),
        (f"{url}#a@{at[4]}", f"ERROR: duplicate key 'a' at byte {at[4]}: its first sample is kept"),
        (f"{url}#c@{at[7]}", f"ERROR: duplicate member 'c.jpg' at byte {at[7]}: the first is kept"),
        (f"{url}#c", c.data)]
    # The kept sample keeps its label, even when it comes after the duplicate member.
    assert [label for _, label, _ in got] == ["0", "1", "2", None, "3"]


def test_hidden_members_are_skipped_without_splitting_a_sample(tmp_path):
    # macOS' tar stores a file's extended attributes as `._NAME`, just before NAME.
    a, b = photos(2)
    apple = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"
    url = make_tar(tmp_path / "a.tar", [
        ("._a.jpg", apple), ("a.jpg", a.data), ("._a.cls", apple), ("a.cls", b"0"),
        ("x/.hidden.png", b"not a sample"), ("b.jpg", b.data), ("b.cls", b"1")])
    assert tar_rows(url) == [(f"{url}#a", "0", a.data), (f"{url}#b", "1", b.data)]


def test_non_image_member_is_read_and_fails_only_itself_in_decoding(tmp_path):
    ps = photos(4)
    blob = b"<html>this is a web page saved as .jpg</html>"
    members = [(f"{p.key}.{p.ext}", p.data) for p in ps]
    members.insert(2, ("blob.jpg", blob))
    url = make_tar(tmp_path / "a.tar", members)
    with open(url, "rb") as f:
        assert [outcome(s) for s in read_tar(f, url)] == [m[1] for m in members]

    errors: list[tuple[str, str]] = []
    images = ShardImages({}, DecodeOptions(image_size=SIZE), batch_size=3, decode_threads=1,
                         reader=TarReader())
    try:
        batches = list(images.batches((Entry(url, url, None),),
                                      lambda e, why: errors.append((e.url, why))))
    finally:
        images.close()
    assert errors == [(f"{url}#blob", "not an image (unrecognised content)")]
    assert [e.url for entries, _ in batches for e in entries] == \
        [f"{url}#{p.key}" for p in ps]
    pixels = np.concatenate([a for _, a in batches])
    want = np.stack([decode_image(p.data, DecodeOptions(image_size=SIZE)) for p in ps])
    np.testing.assert_array_equal(pixels, want)


def test_16_bit_png_in_a_tar_decodes_as_the_loose_file_scaled_not_clipped(tmp_path):
    deep = np.random.default_rng(7).integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    data = encode(deep, "PNG")  # Pillow's mode I;16
    assert data[24] == 16, "a 16-bit PNG"
    photo = Photo("deep", data, "cat", "png")
    (tar,) = write_tars([photo], tmp_path / "tars", tars=1, sidecars=False)
    (loose,) = write_loose([photo], tmp_path / "loose")

    images = ShardImages({}, DecodeOptions(image_size=SIZE), batch_size=4, decode_threads=1,
                         reader=TarReader())
    try:
        ((entries, pixels),) = images.batches((Entry(str(tar), str(tar), None),),
                                              lambda e, why: pytest.fail(why))
    finally:
        images.close()
    assert [e.url for e in entries] == [f"{tar}#deep"]
    opts = DecodeOptions(image_size=SIZE)
    np.testing.assert_array_equal(pixels[0], decode_image(loose.read_bytes(), opts))
    scaled = np.round(deep / 257.0).astype(np.float32)
    np.testing.assert_array_equal(pixels[0], np.repeat(scaled[..., None], 3, axis=2))
    assert (pixels < 255).mean() > 0.9, "not clipped to white"


@pytest.mark.parametrize("content, reason", [
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "not a tar file"),
    (b"", "empty tar file"),
], ids=["jpeg bytes", "empty"])
def test_file_that_is_no_tar_is_one_error_named_by_the_tar(tmp_path, content, reason):
    path = tmp_path / "00000.tar"
    path.write_bytes(content)
    ((name, label, error),) = tar_rows(str(path))
    assert (name, label) == (str(path), None)
    assert error.startswith(f"ERROR: {reason}")


def test_missing_tar_of_a_brace_pattern_is_one_error(tmp_path):
    ps = photos(4)
    write_tars(ps, tmp_path, tars=2)  # 00000.tar and 00001.tar; 00002.tar is missing
    source = WebDatasetSource(f"{tmp_path}/{{00000..00002}}.tar", {})
    urls = pa.concat_tables(source.pages()).column("url").to_pylist()
    got = rows(source.reader.samples(tuple(Entry(url_path(u), u, None) for u in urls), local))
    assert got == intact(urls[0], ps[:2]) + intact(urls[1], ps[2:]) + \
        [(str(tmp_path / "00002.tar"), None, "ERROR: tar not found")]


# -- planning: one entry per tar ------------------------------------------------------------

def plan(source: WebDatasetSource, after: Position = START) -> list[tuple[str, str | None]]:
    pages = list(source.pages(after))
    assert all(p.schema == PAGE_SCHEMA for p in pages)
    t = pa.concat_tables(pages) if pages else PAGE_SCHEMA.empty_table()
    return list(zip(t.column("url").to_pylist(), t.column("label").to_pylist()))


def test_folder_of_tars_plans_each_tar_once_and_resumes(tmp_path):
    root = tmp_path / "laion"
    tars = write_tars(photos(10), root, tars=5)  # with img2dataset's .parquet, _stats.json
    assert len(list(root.iterdir())) == 15
    source = WebDatasetSource(str(root), {})
    assert source.entries_per_shard == 1 and source.format == "webdataset"
    want = [(str(p), None) for p in sorted(tars)]
    assert plan(source) == want
    for k in range(len(want) + 1):
        after = Position(entries=k, last_url=want[k - 1][0] if k else None)
        assert plan(WebDatasetSource(str(root), {}), after) == want[k:]


def test_brace_pattern_plans_its_tars_in_its_order_and_resumes(tmp_path):
    write_tars(photos(8), tmp_path, tars=4)
    pattern = f"{tmp_path}/{{00003,00001,00000,00002}}.tar"
    ordered = [(str(tmp_path / f"{n:05d}.tar"), None) for n in (3, 1, 0, 2)]
    assert plan(WebDatasetSource(pattern, {})) == ordered
    source = WebDatasetSource(f"{tmp_path}/{{00000..00003}}.tar", {})
    want = [(str(tmp_path / f"{n:05d}.tar"), None) for n in range(4)]
    assert plan(source) == want
    assert plan(source, Position(entries=3, last_url=want[2][0])) == want[3:]


def test_one_tar_is_one_entry(one_tar):
    url, _ = one_tar
    assert plan(WebDatasetSource(url, {})) == [(url, None)]


# -- what INPUT is ------------------------------------------------------------------------------

def test_open_source_detects_webdataset_inputs(tmp_path):
    tars = write_tars(photos(4), tmp_path / "tars", tars=2)
    write_loose(photos(2, seed=1), tmp_path / "loose")
    for url in (str(tmp_path / "tars"), str(tars[0]), f"{tmp_path}/tars/{{00000..00001}}.tar"):
        source, out = open_source(url, None, {})
        assert (source.format, out) == ("webdataset", None), url
    source, _ = open_source(str(tmp_path / "tars"), None, {}, InputOptions(label_field="label"))
    assert source.reader == TarReader("label")
    assert open_source(str(tmp_path / "loose"), None, {})[0].format == "folder"
    with pytest.raises(UsageError, match="--label-field is for webdataset INPUT"):
        open_source(str(tmp_path / "loose"), None, {}, InputOptions(label_field="label"))
    # A stray tar among images is no WebDataset: the user says which, nothing is dropped.
    (tmp_path / "loose" / "old-export.tar").write_bytes(tars[0].read_bytes())
    with pytest.raises(UsageError, match="both .tar files and images"):
        open_source(str(tmp_path / "loose"), None, {})
    assert open_source(str(tmp_path / "loose"), None, {},
                       InputOptions(input_format="folder"))[0].format == "folder"
    # Asked for WebDataset, a file that is no tar is refused before any work.
    image = next((tmp_path / "loose").rglob("*.jpg"))
    with pytest.raises(UsageError, match="a WebDataset INPUT is a folder of .tar files"):
        open_source(str(image), None, {}, InputOptions(input_format="webdataset"))


def test_a_duplicate_key_cut_short_is_named_apart_from_the_row_kept(tmp_path):
    a, b, a2 = photos(3)
    url = make_tar(tmp_path / "a.tar", [("a.jpg", a.data), ("a.cls", b"0"),
                                        ("b.jpg", b.data), ("b.cls", b"1"), ("a.jpg", a2.data)])
    Path(url).write_bytes(Path(url).read_bytes()[:-2000])  # cut inside the second a.jpg
    names = [n for n, _, _ in tar_rows(url)]
    assert names[:2] == [f"{url}#a", f"{url}#b"]
    assert len(names) == len(set(names)) == 3 and names[2].startswith(f"{url}#a@")


# -- streaming: a few requests, never whole in memory ---------------------------------------

def test_tar_in_a_bucket_reads_as_on_disk_in_a_few_requests(s3: S3Bucket, tmp_path):
    ps = photos(10, side=256, png=True)  # ~2 MB, 40 members
    (path,) = write_tars(ps, tmp_path, tars=1, sidecars=False)
    size = path.stat().st_size
    assert 1.5e6 < size < TAR_BLOCK
    s3.put("laion/00000.tar", path.read_bytes())  # straight to the store, not through the proxy
    url = s3.url("laion/00000.tar")
    got = tar_rows(url, storage_for=lambda u: Storage(u, s3.options()))
    assert got == [(f"{url}#{n.split('#')[1]}", label, out) for n, label, out in intact(
        str(path), ps)]
    gets = [r for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key == "laion/00000.tar"]
    # One 8 MiB block holds the whole tar: a request per member would be 40.
    assert 1 <= len(gets) <= 3


class ReadRecorder(io.FileIO):
    """A file that remembers the largest read asked of it, and how many bytes it gave."""

    largest = 0
    total = 0

    def read(self, size: int | None = -1) -> bytes:
        self.largest = max(self.largest, size if size is not None and size >= 0 else 1 << 62)
        data = super().read(size)
        self.total += len(data)
        return data


def test_reading_a_big_tar_holds_one_sample_at_a_time(tmp_path):
    ps = photos(26, side=512, png=True)  # ~20 MB
    (path,) = write_tars(ps, tmp_path, tars=1, sidecars=False)
    size = path.stat().st_size
    assert size > 20e6
    biggest = max(len(p.data) for p in ps)
    with ReadRecorder(path, "rb") as f:
        tracemalloc.start()
        try:
            n = 0
            for s in read_tar(f, str(path)):
                n += len(s.load())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        largest, total = f.largest, f.total
    assert n == sum(len(p.data) for p in ps)
    assert largest <= 2 * 2**20, "no read asks for more than a member (or a 1 MiB chunk)"
    assert total < 1.1 * size, "the tar is read once"
    assert peak < 4 * biggest + 2**20, f"{peak} bytes held reading a {size}-byte tar"
