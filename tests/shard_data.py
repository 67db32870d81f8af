"""Web-dataset tar shards and parquet files built from generated images, with a bad record of every kind.

Each writer returns what a correct build must make of it: {source ("shard:key"): caption} for the records kept,
{reason: [source, ...]} for the records skipped, and {source: PIL image} to compare the kept pixels with.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("red", "blue", "green", "circle", "square", "small", "large", "cat", "dog", "on", "a", "mat")


def png_bomb_bytes() -> bytes:
    """A tiny PNG whose header claims 40000×40000 pixels, far past PIL's decompression-bomb limit."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _image(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] | None = None) -> Image.Image:
    width, height = size or (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))


class Expected:
    def __init__(self) -> None:
        self.kept: dict[str, str] = {}
        self.images: dict[str, Image.Image] = {}
        self.skipped: dict[str, list[str]] = {}
        self.converted: dict[str, list[str]] = {}

    def keep(self, source: str, caption: str, img: Image.Image, converted: str | None = None) -> None:
        self.kept[source], self.images[source] = caption, img
        if converted:
            self.converted.setdefault(converted, []).append(source)

    def skip(self, reason: str, source: str) -> None:
        self.skipped.setdefault(reason, []).append(source)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(folder: Path, rng: np.random.Generator, good_per_shard: int = 24) -> Expected:
    """Three shards as img2dataset writes them: shard 0 and 1 with good records and every bad kind, shard 2 cut
    off in the middle of a member (a damaged download)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = Expected()
    for shard in range(3):
        name = f"{shard:05d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(good_per_shard):
                key = f"{shard:05d}{i:04d}"
                caption, fmt = _caption(rng), ("PNG", "WEBP", "PNG")[i % 3]
                img = _image(rng)
                data = _encoded(img, fmt)
                if fmt == "WEBP":  # lossy: the build sees the decoded pixels
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                _add(tar, f"{key}.{'png' if fmt == 'PNG' else 'webp'}", data)
                if i % 4 == 1:  # caption from the json alone (img2dataset's metadata)
                    _add(tar, f"{key}.json", f'{{"caption": "{caption}", "url": "http://x"}}'.encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                    _add(tar, f"{key}.json", b'{"url": "http://x", "status": "success"}')
                expected.keep(f"{name}:{key}", caption, img)
            if shard < 2:
                _add_bad_records(tar, name, f"{shard:05d}9", rng, expected)
        if shard == 2:  # cut inside the last key's image: the records before it are kept
            with tarfile.open(folder / name) as tar:
                image = [m for m in tar.getmembers() if m.name.endswith((".png", ".webp"))][-1]
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data[: image.offset_data + image.size // 2])
            last = f"{name}:{shard:05d}{good_per_shard - 1:04d}"
            del expected.kept[last], expected.images[last]
            expected.skip("unreadable shard", name)
    return expected


def _add_bad_records(tar: tarfile.TarFile, name: str, bad: str, rng: np.random.Generator,
                     expected: Expected) -> None:
    """One record of every bad kind (and a grayscale image, kept and reported as converted)."""
    grey = _image(rng).convert("L")
    _add(tar, f"{bad}001.png", _encoded(grey, "PNG"))
    _add(tar, f"{bad}001.txt", b"a grey picture")
    expected.keep(f"{name}:{bad}001", "a grey picture", grey, converted="L")
    _add(tar, f"{bad}002.png", _encoded(_image(rng), "PNG"))  # no caption at all
    expected.skip("missing caption", f"{name}:{bad}002")
    _add(tar, f"{bad}003.png", _encoded(_image(rng), "PNG"))
    _add(tar, f"{bad}003.txt", b"  \n ")
    expected.skip("missing caption", f"{name}:{bad}003")
    _add(tar, f"{bad}004.png", _encoded(_image(rng), "PNG"))
    _add(tar, f"{bad}004.txt", b"caf\xe9 latin-1")
    expected.skip("unreadable caption", f"{name}:{bad}004")
    _add(tar, f"{bad}005.jpg", b"not a jpeg at all")
    _add(tar, f"{bad}005.txt", b"garbage bytes")
    expected.skip("corrupt", f"{name}:{bad}005")
    png = _encoded(_image(rng), "PNG")
    _add(tar, f"{bad}006.png", png[: len(png) // 2])
    _add(tar, f"{bad}006.txt", b"half a png")
    expected.skip("corrupt", f"{name}:{bad}006")
    _add(tar, f"{bad}007.txt", b"a caption without its image")
    expected.skip("orphan caption", f"{name}:{bad}007")
    _add(tar, f"{bad}008.cls", b"3")
    _add(tar, f"{bad}008.txt", b"a class label, no image")
    expected.skip("non-image", f"{name}:{bad}008")
    _add(tar, f"{bad}009.png", png_bomb_bytes())
    _add(tar, f"{bad}009.txt", b"a bomb")
    expected.skip("decompression bomb", f"{name}:{bad}009")
    _add(tar, f"{bad}010.png", _encoded(_image(rng), "PNG"))
    _add(tar, f"{bad}010.png", _encoded(_image(rng), "PNG"))  # the same member twice
    _add(tar, f"{bad}010.txt", b"twice")
    expected.skip("duplicate key", f"{name}:{bad}010")


def write_parquet_files(folder: Path, rng: np.random.Generator, good: int = 40) -> Expected:
    """img2dataset-style parquet (``key``, ``jpg`` bytes, ``caption``) with a bad row of every kind, and a damaged
    parquet file next to it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    expected = Expected()
    keys, images, captions = [], [], []
    name = "part-00000.parquet"
    for i in range(good):
        img, caption = _image(rng, "RGBA") if i == 3 else _image(rng), _caption(rng)
        keys.append(f"{i:06d}")
        images.append(_encoded(img, "PNG"))
        captions.append(caption)
        expected.keep(f"{name}:row {i} (key {i:06d})", caption, img, converted="RGBA" if i == 3 else None)
    bad = [(None, "no image", "missing image"), (b"", "empty bytes", "missing image"),
           (_encoded(_image(rng), "PNG"), None, "missing caption"),
           (_encoded(_image(rng), "PNG"), "   ", "missing caption"),
           (b"\x89PNG but broken", "broken", "corrupt"), (png_bomb_bytes(), "bomb", "decompression bomb")]
    for image, caption, reason in bad:
        row = len(keys)
        keys.append(f"{row:06d}")
        images.append(image)
        captions.append(caption)
        expected.skip(reason, f"{name}:row {row} (key {row:06d})")
    table = pa.table({"key": keys, "jpg": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string()),
                      "url": ["http://x"] * len(keys)})
    pq.write_table(table, folder / name, row_group_size=16)
    (folder / "part-00001.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    expected.skip("unreadable shard", "part-00001.parquet")
    return expected


def write_hf_parquet(folder: Path, rng: np.random.Generator, count: int = 12) -> Expected:
    """An HF-datasets export: ``image`` as {"bytes", "path"} structs and a ``text`` column, no key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    expected = Expected()
    rows, texts = [], []
    for i in range(count):
        img, caption = _image(rng), _caption(rng)
        rows.append({"bytes": _encoded(img, "PNG"), "path": f"{i}.png"})
        texts.append(caption)
        expected.keep(f"train.parquet:row {i}", caption, img)
    pq.write_table(pa.table({"image": rows, "text": texts}), folder / "train.parquet")
    return expected
