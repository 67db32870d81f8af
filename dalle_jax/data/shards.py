"""Web-dataset tar shards and parquet files (the formats img2dataset, LAION, CC3M/CC12M and COYO ship in) → a TFDS
dataset (array_record) in the same schema as a folder build (`dalle_jax.data.folder`).

Inputs:
- tar shards as img2dataset writes them: ``KEY.jpg|png|webp|...`` + ``KEY.txt`` (the caption), optional ``KEY.json``
  (its ``"caption"`` is used when there is no ``.txt``). The key is the member's path up to the first dot of its name.
- parquet files with image bytes and a caption per row (img2dataset: ``jpg`` + ``caption``; HF-datasets exports:
  ``image`` as ``{"bytes", "path"}`` + a text column). Column names are guessed from those or given.

Every record either becomes an example or lands in the build report under a reason, named ``shard:key``: corrupt,
non-image, decompression bomb, missing image, missing caption, unreadable caption, orphan caption, duplicate key,
unreadable shard (a truncated tar keeps the records before the damage). Conversions and upscales are reported as
for a folder. Preprocessing is the folder's (the released DALL·E ``preprocess``).

How the work is split, so it scales from a laptop to a pod:

    shard i  ->  one worker (a local process, --workers) on host i % hosts
             ->  OUT/captioned_shards/<config>/1.0.0/.parts/{i:05d}-{split}.array_record + {i:05d}.json
    then host 0 renames the parts into TFDS's shard names and writes dataset_info.json and build_report.json

A shard whose part report exists (same file size and mtime) is not converted again, so an interrupted build resumes
where it stopped. Example ids are ``i * 2**32 + record position``, and the splits come from a hash of ``shard:key``:
the dataset is the same whatever the number of workers or hosts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dalle_jax.data import folder
from dalle_jax.data.folder import REPORT_FILENAME, BuildReport, FolderInputError

DATASET_NAME = "captioned_shards"
SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "img", "image_bytes")  # guessed in this order
CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt")
_PARTS = ".parts"
_RECORD_OFFSET = 2**32  # example id = shard index * this + record position


@dataclass(frozen=True)
class ShardsSpec:
    """What to build: the shard files, output resolution, parquet columns and split.

    Attributes:
        sources: tar / parquet files, or folders holding them (not searched recursively).
        image_size: side S of the square uint8 images written.
        image_column / caption_column: parquet column names; None guesses (IMAGE_COLUMNS, CAPTION_COLUMNS).
        validation_fraction: share of records (by a stable hash of ``shard:key``) in the validation split.
        seed: salts that hash.
    """

    sources: tuple[str, ...]
    image_size: int = 64
    image_column: str | None = None
    caption_column: str | None = None
    validation_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        folder.check_build_options(self.image_size, self.validation_fraction)


def is_shard_source(path: str | Path) -> bool:
    """Whether `path` is a tar/parquet file or a folder holding some (and no dataset_info.json)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in SHARD_SUFFIXES
    return path.is_dir() and not (path / "dataset_info.json").exists() and any(
        p.suffix.lower() in SHARD_SUFFIXES for p in path.iterdir() if p.is_file())


def list_shards(sources: tuple[str, ...]) -> list[Path]:
    """The shard files the sources name, folders expanded (sorted), duplicates dropped, in a fixed order."""
    shards: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass tar / parquet files or folders holding them")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES)
            if not found:
                raise FolderInputError(f"{path} holds no .tar or .parquet files; for a folder of images with name.txt "
                                       "captions use `dalle-jax data folder`")
            shards += found
        elif path.suffix.lower() in SHARD_SUFFIXES:
            shards.append(path)
        else:
            raise FolderInputError(f"{path} is not a .tar or .parquet file; pass web-dataset tar shards or parquet "
                                   "files (or a folder holding them)")
    unique = list(dict.fromkeys(p.resolve() for p in shards))
    return unique


def _shard_names(shards: list[Path]) -> list[str]:
    """How the report names each shard: its path relative to the shards' common folder."""
    root = Path(os.path.commonpath([str(p.parent) for p in shards]))
    return [p.relative_to(root).as_posix() for p in shards]


# ------------------------------------------------------------------------------------------------ reading records

# One record: (key, image bytes or None, caption or None, problem or None); a problem names why it is unusable.
Record = tuple[str, bytes | None, str | None, folder.CaptionProblem | None]


def _caption_from_bytes(data: bytes, what: str) -> tuple[str | None, folder.CaptionProblem | None]:
    try:
        caption = folder.normalize_caption(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        return None, ("unreadable caption", f"{what} is not UTF-8 (byte {err.start})")
    return (caption, None) if caption else (None, ("missing caption", f"{what} is empty"))


def _tar_key(member_name: str) -> tuple[str, str]:
    """web-dataset convention: the key is the path up to the first dot of the file name; the rest is the field."""
    directory, _, name = member_name.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _tar_group(key: str, files: dict[str, bytes], duplicates: list[str], image_extensions: set[str]) -> Record:
    """One key's files -> a record."""
    if duplicates:
        return key, None, None, ("duplicate key", f"{key} appears twice in the shard ({', '.join(duplicates)})")
    images = [ext for ext in files if f".{ext}" in image_extensions]
    caption, problem = None, None
    if "txt" in files:
        caption, problem = _caption_from_bytes(files["txt"], f"{key}.txt")
    elif "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError) as err:
            problem = ("unreadable caption", f"{key}.json is not JSON ({err})")
        else:
            text = meta.get("caption") if isinstance(meta, dict) else None
            caption = folder.normalize_caption(text) if isinstance(text, str) else None
            if not caption:
                problem = ("missing caption", f"no {key}.txt and no \"caption\" in {key}.json")
    else:
        problem = ("missing caption", f"no {key}.txt")
    if not images:
        others = sorted(set(files) - {"txt", "json"})
        if others:
            return key, None, None, ("non-image", f"{key}.{others[0]} is not an image format")
        return key, None, None, ("orphan caption", f"no image with key {key}")
    return key, files[images[0]], caption, problem


def tar_records(path: Path) -> Iterator[Record]:
    """The records of one web-dataset tar, in member order; a damaged tar yields an "unreadable shard" record for
    the damage after the records read before it (img2dataset writes a key's files next to each other)."""
    image_extensions = folder.readable_image_extensions()
    key, files, duplicates, seen = None, {}, [], set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = _tar_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield _tar_group(key, files, duplicates, image_extensions)
                    key, files, duplicates = member_key, {}, []
                    if member_key in seen:
                        duplicates.append(member.name)
                    seen.add(member_key)
                if extension in files:
                    duplicates.append(member.name)
                files[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        yield "", None, None, ("unreadable shard", f"the tar is damaged ({err}); records before the damage were kept")
        return
    if key is not None:
        yield _tar_group(key, files, duplicates, image_extensions)


def _pick_column(names: list[str], given: str | None, guesses: tuple[str, ...], what: str, flag: str,
                 path: Path) -> str:
    if given is not None:
        if given not in names:
            raise FolderInputError(f"{path} has no {what} column '{given}' (columns: {', '.join(names)}); pass "
                                   f"{flag} one of them")
        return given
    for name in guesses:
        if name in names:
            return name
    raise FolderInputError(f"{path}: no {what} column among {', '.join(names)} (looked for "
                           f"{', '.join(guesses)}); pass {flag} NAME")


def parquet_columns(path: Path, spec: ShardsSpec) -> tuple[str, str, str | None]:
    """(image column, caption column, key column or None) of one parquet file; a missing column is an error."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    image = _pick_column(names, spec.image_column, IMAGE_COLUMNS, "image", "--image-column", path)
    caption = _pick_column(names, spec.caption_column, CAPTION_COLUMNS, "caption", "--caption-column", path)
    return image, caption, ("key" if "key" in names else None)


def parquet_records(path: Path, spec: ShardsSpec) -> Iterator[Record]:
    """The rows of one parquet file as records, keyed by its ``key`` column or ``row N``."""
    import pyarrow.parquet as pq

    try:
        image_column, caption_column, key_column = parquet_columns(path, spec)
        reader = pq.ParquetFile(path)
        row = 0
        columns = [image_column, caption_column] + ([key_column] if key_column else [])
        for batch in reader.iter_batches(batch_size=256, columns=columns):
            values = batch.to_pydict()
            for i in range(batch.num_rows):
                key = f"row {row}" + (f" (key {values[key_column][i]})" if key_column else "")
                row += 1
                yield _parquet_record(key, values[image_column][i], values[caption_column][i])
    except FolderInputError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError on a damaged file
        yield "", None, None, ("unreadable shard", f"not a readable parquet file ({err})")


def _parquet_record(key: str, image: Any, caption: Any) -> Record:
    if isinstance(image, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes")
    if not isinstance(image, (bytes, bytearray)) or not image:
        return key, None, None, ("missing image", "no image bytes in this row")
    if isinstance(caption, bytes):
        text, problem = _caption_from_bytes(caption, "the caption")
        return key, bytes(image), text, problem
    if caption is not None and not isinstance(caption, str):
        return key, bytes(image), None, ("unreadable caption", f"the caption is a {type(caption).__name__}")
    text = folder.normalize_caption(caption or "")
    return key, bytes(image), text or None, None if text else ("missing caption", "the caption is empty")


# ------------------------------------------------------------------------------------------------ converting

def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _part_paths(version_dir: Path, index: int) -> tuple[Path, dict[str, Path]]:
    parts = version_dir / _PARTS
    return parts / f"{index:05d}.json", {split: parts / f"{index:05d}-{split}.array_record"
                                         for split in ("train", "validation")}


def convert_shard(version_dir: str, index: int, shard: str, name: str, spec: ShardsSpec, host: int = 0) -> dict:
    """Converts shard `index` into its part files; returns (and writes, last) its part report, which names the
    `host` that converted it. Runs in a worker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(shard)
    report_path, record_paths = _part_paths(Path(version_dir), index)
    features = folder.example_features(spec.image_size)
    report = BuildReport(kind="shards")
    counts = {"train": 0, "validation": 0}
    writers = {split: ArrayRecordWriter(str(p), "group_size:1") for split, p in record_paths.items()}
    records = tar_records(path) if path.suffix.lower() == ".tar" else parquet_records(path, spec)
    fingerprint = hashlib.sha256()
    first = None  # the train record whose split hash comes first: (hash, row in the train part)
    try:
        for position, (key, data, caption, problem) in enumerate(records):
            source = f"{name}:{key}" if key else name
            img = None
            if data is not None:  # an image that does not decode is corrupt whatever its caption
                img, image_problem = folder.open_image(data, named_as_image=True)
                problem = image_problem or problem
            if problem is not None:
                report.skip(problem[0], source, problem[1])
                continue
            report.keep(source, img, spec.image_size)
            image, _ = folder.preprocess_image(img, spec.image_size)
            split = folder.assign_split(source, spec.validation_fraction, spec.seed)
            if split == "train":
                where = folder.split_position(source, spec.seed)
                first = min(first, (where, counts["train"])) if first else (where, counts["train"])
            example_id = index * _RECORD_OFFSET + position
            writers[split].write(features.serialize_example(
                {"image": image, "caption": caption, "id": example_id, "source": source}))
            counts[split] += 1
            fingerprint.update(f"{source}\0{caption}\0".encode() + hashlib.sha256(data).digest())
    finally:
        for writer in writers.values():
            writer.close()
    report.kept = sum(counts.values())
    part = {"shard": str(path), "name": name, "stamp": _file_stamp(path), "counts": counts, "first_train": first,
            "host": host,
            "fingerprint": fingerprint.hexdigest(), "report": dataclasses.asdict(report)}
    tmp = report_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(part) + "\n")
    tmp.replace(report_path)  # the part counts as done only once its report is complete
    return part


def _done_part(version_dir: Path, index: int, shard: Path) -> dict | None:
    report_path, _ = _part_paths(version_dir, index)
    if not report_path.is_file():
        return None
    part = json.loads(report_path.read_text())
    return part if part["shard"] == str(shard) and part["stamp"] == _file_stamp(shard) else None


def shards_config_name(spec: ShardsSpec, shards: list[Path]) -> str:
    """The dataset's config name: a slug of the first shard's folder + size + a hash of every field and shard."""
    key = json.dumps([[str(p) for p in shards], spec.image_size, spec.image_column, spec.caption_column,
                      spec.validation_fraction, spec.seed])
    slug = re.sub(r"[^a-z0-9]+", "_", shards[0].parent.name.lower()).strip("_")[:32] or "shards"
    return f"{slug}_{spec.image_size}px_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def build_shards(data_dir: str, spec: ShardsSpec, *, workers: int = 1, overwrite: bool = False,
                 process_index: int = 0, process_count: int = 1, verbose: bool = False,
                 barrier: Any = None) -> tuple[str, BuildReport]:
    """Converts this process's share of the shards (shard i on process i % process_count), then process 0 writes
    the dataset; returns its version directory and the merged report (every process returns them).

    `barrier(name)` waits for every process (multi-host: `distributed.barrier`); with one process it is not needed.

    Raises:
        FileNotFoundError / FolderInputError: a source is missing, holds no shards, or lacks a parquet column.
        FileExistsError: the dataset was built before from shards that have changed since, and not `overwrite`.
    """
    shards = list_shards(spec.sources)
    names = _shard_names(shards)
    for shard in shards:  # every parquet's columns before any work: one clear line, not a thousand skips
        if shard.suffix.lower() == ".parquet":
            try:
                parquet_columns(shard, spec)
            except FolderInputError:
                raise
            except Exception:  # noqa: BLE001  (unreadable: its worker reports it as an "unreadable shard")
                pass
    version_dir = Path(data_dir).expanduser().resolve() / DATASET_NAME / shards_config_name(spec, shards) / "1.0.0"
    report_path = version_dir / REPORT_FILENAME
    if (version_dir / "dataset_info.json").is_file():
        previous = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if previous.get("stamps") == [_file_stamp(p) for p in shards]:
            if verbose:
                print(f"{version_dir} is already built from these shards; reusing it")
            return str(version_dir), _report_from_json(previous)
        if not overwrite:
            raise FileExistsError(f"{version_dir} holds a build of these shards from before they changed; pass "
                                  "--overwrite (overwrite=True) to rebuild it, or delete that directory")
    if overwrite and process_index == 0 and version_dir.exists():
        import shutil

        shutil.rmtree(version_dir)
    if barrier is not None:
        barrier("shards-cleared")
    (version_dir / _PARTS).mkdir(parents=True, exist_ok=True)

    mine = [i for i in range(len(shards)) if i % process_count == process_index
            and _done_part(version_dir, i, shards[i]) is None]
    _convert_all(version_dir, mine, shards, names, spec, workers, process_index, verbose)
    if barrier is not None:
        barrier("shards-converted")
    if process_index == 0:
        _finish(version_dir, shards, spec)
    if barrier is not None:
        barrier("shards-finished")
    while not report_path.is_file():  # without a barrier, hosts other than 0 wait for its files
        time.sleep(1.0)
    report = _report_from_json(json.loads(report_path.read_text()))
    if verbose:
        folder.print_report(report, str(version_dir))
    return str(version_dir), report


def _convert_all(version_dir: Path, indices: list[int], shards: list[Path], names: list[str], spec: ShardsSpec,
                 workers: int, host: int, verbose: bool) -> None:
    bar = tqdm(total=len(indices), desc="converting shards", unit="shard", disable=not verbose)
    if workers <= 1 or len(indices) <= 1:
        for i in indices:
            convert_shard(str(version_dir), i, str(shards[i]), names[i], spec, host)
            bar.update()
    else:  # spawned, not forked: the parent may hold JAX's threads
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(convert_shard, str(version_dir), i, str(shards[i]), names[i], spec, host)
                       for i in indices]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update()
    bar.close()


def _finish(version_dir: Path, shards: list[Path], spec: ShardsSpec) -> None:
    """Renames the parts into TFDS's shard files, writes dataset_info.json and the merged build report."""
    import tensorflow_datasets as tfds

    parts = []
    for i, shard in enumerate(shards):
        part = _done_part(version_dir, i, shard)
        if part is None:
            raise FolderInputError(f"shard {shard} has no finished part in {version_dir / _PARTS}: a host stopped "
                                   "before converting it; rerun the same command")
        parts.append(part)
    report = BuildReport(kind="shards")
    report.splits = {"train": 0, **({"validation": 0} if spec.validation_fraction > 0 else {})}
    fingerprint = hashlib.sha256()
    for part in parts:
        for reason, entries in part["report"]["skipped"].items():
            report.skipped.setdefault(reason, []).extend(entries)
        for mode, entries in part["report"]["converted"].items():
            report.converted.setdefault(mode, []).extend(entries)
        report.upscaled += part["report"]["upscaled"]
        report.details.update(part["report"]["details"])
        fingerprint.update(part["fingerprint"].encode())
        for split, count in part["counts"].items():
            if split in report.splits:
                report.splits[split] += count
    report.kept = sum(report.splits.values())
    report.fingerprint = fingerprint.hexdigest()
    if not report.kept:
        raise FolderInputError(f"no usable records in {len(shards)} shards (found {report.skipped_counts()}); see "
                               f"{version_dir / _PARTS} for each shard's report")
    if spec.validation_fraction > 0 and not report.splits["validation"]:
        _move_first_to_validation(version_dir, parts, report)

    split_infos = []
    for split in report.splits:
        files = [(_part_paths(version_dir, i)[1][split], part["counts"][split]) for i, part in enumerate(parts)]
        files = [(path, count) for path, count in files if count]
        for k, (path, _) in enumerate(files):
            path.replace(version_dir / f"{DATASET_NAME}-{split}.array_record-{k:05d}-of-{len(files):05d}")
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[count for _, count in files], num_bytes=0,
                                               filename_template=None))
    tfds.folder_dataset.write_metadata(
        data_dir=str(version_dir), features=folder.example_features(spec.image_size), split_infos=split_infos,
        check_data=False,  # the check reads through tf.data, which needs TensorFlow
        description=f"{spec.image_size}x{spec.image_size} images with captions from {len(shards)} shards")
    (version_dir / REPORT_FILENAME).write_text(json.dumps(
        {**report.to_json(), "shards": [str(p) for p in shards], "stamps": [_file_stamp(p) for p in shards]},
        indent=2) + "\n")


def _move_first_to_validation(version_dir: Path, parts: list[dict], report: BuildReport) -> None:
    """The folder builder's rule: a non-zero fraction always gives validation at least one record (the train record
    whose hash comes first), since a small dataset would otherwise build without one and fail in training."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    if report.kept < 2:
        raise FolderInputError(f"only {report.kept} usable record: training needs one for validation and at least "
                               "one to train on; add records (or pass --validation-fraction 0)")
    index = min((i for i, part in enumerate(parts) if part["first_train"]), key=lambda i: parts[i]["first_train"])
    row = parts[index]["first_train"][1]
    paths = _part_paths(version_dir, index)[1]
    reader = ArrayRecordReader(str(paths["train"]))
    records = reader.read_all()
    reader.close()
    for split, rows in (("train", records[:row] + records[row + 1:]), ("validation", [records[row]])):
        writer = ArrayRecordWriter(str(paths[split]), "group_size:1")
        for record in rows:
            writer.write(record)
        writer.close()
    parts[index]["counts"] = {"train": len(records) - 1, "validation": 1}
    report.splits["train"] -= 1
    report.splits["validation"] = 1


def _report_from_json(data: dict) -> BuildReport:
    fields = {f.name for f in dataclasses.fields(BuildReport)}
    return BuildReport(**{k: v for k, v in data.items() if k in fields})
