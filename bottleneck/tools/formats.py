"""The same photos stored the three ways INPUT comes in, written the way the tools that
make big collections write them: loose files in class folders, img2dataset's WebDataset
tars, and a Hugging Face `datasets` Parquet table. For the tests and the input benchmark.

    photos = [Photo("000000000", jpeg_bytes, "cat"), ...]
    write_loose(photos, "in/loose")            # in/loose/cat/000000000.jpg
    write_tars(photos, "in/tars", tars=4)      # in/tars/00000.tar (+ .parquet, _stats.json)
    write_hf_parquet(photos, "in/table.parquet")

The bytes are stored as given in every layout, so the three decode to the same pixels.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Photo:
    key: str  # img2dataset's key: shard number and index, zero-padded ("000010003")
    data: bytes  # the encoded image, stored as is
    label: str
    ext: str = "jpg"
    caption: str = ""


def classes(photos: Sequence[Photo]) -> list[str]:
    return sorted({p.label for p in photos})


def write_loose(photos: Sequence[Photo], folder: str | Path) -> list[Path]:
    """`folder/LABEL/KEY.EXT`, one file a photo."""
    out = []
    for p in photos:
        path = Path(folder, p.label, f"{p.key}.{p.ext}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(p.data)
        out.append(path)
    return out


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tars(photos: Sequence[Photo], folder: str | Path, tars: int,
               sidecars: bool = True) -> list[Path]:
    """img2dataset's output: `NNNNN.tar` holding, per sample, `KEY.EXT`, `KEY.txt` (the
    caption), `KEY.json` (its metadata, here with `label`) and `KEY.cls` (the class index
    in `classes(photos)`), members in that order; with `sidecars`, img2dataset's
    `NNNNN.parquet` and `NNNNN_stats.json` beside each tar. Photos are split evenly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(folder).mkdir(parents=True, exist_ok=True)
    index = {c: i for i, c in enumerate(classes(photos))}
    per = -(-len(photos) // tars)
    out = []
    for n in range(tars):
        chunk = photos[n * per:(n + 1) * per]
        path = Path(folder, f"{n:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for p in chunk:
                meta = {"key": p.key, "status": "success", "caption": p.caption,
                        "label": p.label, "url": f"https://example.com/{p.key}.{p.ext}"}
                tar_member(tar, f"{p.key}.{p.ext}", p.data)
                tar_member(tar, f"{p.key}.txt", p.caption.encode())
                tar_member(tar, f"{p.key}.json", json.dumps(meta).encode())
                tar_member(tar, f"{p.key}.cls", str(index[p.label]).encode())
        if sidecars:
            pq.write_table(pa.table({"key": [p.key for p in chunk],
                                     "status": ["success"] * len(chunk),
                                     "caption": [p.caption for p in chunk]}),
                           Path(folder, f"{n:05d}.parquet"))
            Path(folder, f"{n:05d}_stats.json").write_text(json.dumps(
                {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0}))
        out.append(path)
    return out


def write_hf_parquet(photos: Sequence[Photo], path: str | Path, row_group_size: int = 100
                     ) -> Path:
    """A Hugging Face dataset (`datasets.Image()` and `ClassLabel` features) written with
    `Dataset.to_parquet`: an `image` struct column {bytes, path} and an integer `label`
    whose names are in the schema's `huggingface` metadata."""
    import datasets

    names = classes(photos)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.data, "path": f"{p.key}.{p.ext}"} for p in photos],
         "label": [names.index(p.label) for p in photos]}, features=features)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path), batch_size=row_group_size)
    return Path(path)
