"""A user's folder of captioned images → a TFDS dataset (array_record) in the project's common schema.

Captions come from a sidecar ``name.txt`` beside each image (same stem) or from a manifest (JSONL lines
``{"path": ..., "caption": ...}`` or TSV ``path<TAB>caption``; paths relative to the manifest's folder or
absolute). Real folders are messy, so every file either becomes an example or lands in the build report
under a reason (corrupt, non-image, missing caption, ...), with its name; conversions (CMYK, alpha, palette,
16-bit, grayscale) and upscales are reported the same way. Nothing crashes the build and nothing vanishes.

Preprocessing follows the released DALL·E ``preprocess``: RGB, short side resized to S with LANCZOS
(rounded like the reference), centre crop S×S, uint8. EXIF orientation is applied first so phone photos
come out upright.

Typical use::

    dalle-jax data folder ~/photos --out ~/tensorflow_datasets --image-size 64

which writes ``~/tensorflow_datasets/captioned_folder/<config>/1.0.0`` plus ``build_report.json`` there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dalle_jax.errors import DatasetError

REPORT_FILENAME = "build_report.json"
# Order used in the summary line; the keys of BuildReport.skipped.
SKIP_REASONS = (
    "corrupt",
    "non-image",
    "unreadable file",
    "decompression bomb",
    "missing caption",
    "unreadable caption",
    "orphan caption",
    "hidden",
    "repeated folder link",
    "malformed manifest line",
    "missing file",
    # web-dataset tar shards and parquet files (dalle_jax.data.shards)
    "missing image",
    "duplicate key",
    "unreadable shard",
)
_MODE_NAMES = {
    "L": "grayscale (L)",
    "LA": "grayscale+alpha (LA)",
    "1": "1-bit (1)",
    "P": "paletted (P)",
    "P+transparency": "paletted+transparency (P)",
    "I;16": "16-bit (I;16)",
    "I": "32-bit int (I)",
}
_PER_CATEGORY_LIST_LIMIT = 20  # CLI printing only; build_report.json always holds every file


class FolderInputError(DatasetError):
    """The folder (or its spec) cannot produce a dataset; the message names the path and the fix."""


def check_build_options(image_size: int, validation_fraction: float) -> None:
    """What every builder of a user's dataset (folder, shards) requires of its size and split."""
    if image_size < 1:
        raise FolderInputError(f"image_size must be positive, got {image_size}")
    if not 0.0 <= validation_fraction < 1.0:
        raise FolderInputError(f"validation_fraction must be in [0, 1), got {validation_fraction}")


@dataclass(frozen=True)
class FolderSpec:
    """What to build: the source folder, output resolution, caption source and split.

    Attributes:
        source: folder of images (walked recursively).
        image_size: side S of the square uint8 images written.
        manifest: JSONL/TSV caption manifest; None means sidecar ``name.txt`` captions.
        validation_fraction: share of images (by a stable hash of their path) in the validation split.
        seed: salts that hash, giving a different but still stable split.
    """

    source: str
    image_size: int = 64
    manifest: str | None = None
    validation_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        check_build_options(self.image_size, self.validation_fraction)


@dataclass
class BuildReport:
    """What happened to every file: kept (per split), skipped (per reason), converted (per mode), upscaled.

    Entries are paths relative to the source folder; manifest problems read ``manifest.jsonl:LINE: ...``.
    ``details`` maps an entry to the underlying error message where one helps (e.g. the decoder's).
    """

    kind: str = "folder"  # what was read: "folder" or "shards"; the summary's first word
    kept: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    converted: dict[str, list[str]] = field(default_factory=dict)
    upscaled: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""  # hash of the kept files' names, captions and bytes; detects a changed folder

    def skip(self, reason: str, entry: str, detail: str | None = None) -> None:
        self.skipped.setdefault(reason, []).append(entry)
        if detail:
            self.details[entry] = detail

    def keep(self, entry: str, img: Image.Image, image_size: int) -> None:
        """Notes a kept image's conversion (its mode, unless RGB) and whether it is upscaled to `image_size`."""
        label = mode_label(img)
        if label is not None:
            self.converted.setdefault(label, []).append(entry)
        if min(img.size) < image_size:
            self.upscaled.append(entry)

    def skipped_counts(self) -> str:
        """"3 corrupt, 1 missing caption", or "none"."""
        skipped = [f"{len(self.skipped[r])} {r}" for r in SKIP_REASONS if self.skipped.get(r)]
        return ", ".join(skipped) or "none"

    def summary(self) -> str:
        splits = ", ".join(
            f"{name} {count}" + ("" if count else " (split not written)") for name, count in self.splits.items()
        )
        converted = [f"{len(files)} {_MODE_NAMES.get(m, m)}" for m, files in sorted(self.converted.items())]
        return (
            f"{self.kind} dataset: {self.kept} images kept ({splits}); "
            f"skipped: {self.skipped_counts()}; "
            f"converted: {', '.join(converted) or 'none'}; "
            f"upscaled: {len(self.upscaled)}"
        )

    def file_lines(self, limit: int | None = None) -> list[str]:
        """The per-file list, one ``category: file [— detail]`` line each; ``limit`` caps each category."""
        groups = [(f"skipped ({r})", self.skipped.get(r, [])) for r in SKIP_REASONS]
        groups += [(f"converted ({m})", files) for m, files in sorted(self.converted.items())]
        groups.append(("upscaled", self.upscaled))
        lines = []
        for label, entries in groups:
            shown = entries if limit is None else entries[:limit]
            for entry in shown:
                detail = self.details.get(entry)
                lines.append(f"  {label}: {entry}" + (f" — {detail}" if detail else ""))
            if len(entries) > len(shown):
                lines.append(f"  {label}: ... and {len(entries) - len(shown)} more (see {REPORT_FILENAME})")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": self.summary()}


# Why a record is unusable: (report reason, detail saying what to do, or None).
CaptionProblem = tuple[str, str | None]


class CaptionedImage(NamedTuple):
    """One usable image: its absolute path and normalised caption."""

    path: str
    caption: str


# ----------------------------------------------------------------------------------------------- images


def mode_label(img: Image.Image) -> str | None:
    """The conversion an image needs, as the report's key; None for plain RGB."""
    if img.mode == "RGB":
        return None
    if img.mode == "P" and "transparency" in img.info:
        return "P+transparency"
    return img.mode


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        # PIL's own I→L conversion clips at 255; scale the 16-bit range instead (65535 → 255).
        values = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        gray = np.round(values / 257.0).astype(np.uint8)  # (H, W)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "F":
        return img.convert("L").convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or (mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels often hide arbitrary colours (commonly black).
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def preprocess_image(img: Image.Image, size: int) -> tuple[np.ndarray, list[str]]:
    """Paper preprocessing: RGB, short side → ``size`` (LANCZOS), centre crop; returns (S, S, 3) uint8.

    Sizes and crop offsets are rounded like the released DALL·E ``preprocess`` (Python ``round``).

    Returns:
        The image and notes on what was done beyond resizing ("converted from RGBA", "upscaled from 10x7").
    """
    notes = []
    label = mode_label(img)
    if label is not None:
        notes.append(f"converted from {label}")
    width, height = img.size
    if min(width, height) < size:
        notes.append(f"upscaled from {width}x{height}")
    rgb = _to_rgb(img)
    scale = size / min(width, height)
    new_width, new_height = round(scale * width), round(scale * height)
    if (new_width, new_height) != rgb.size:
        rgb = rgb.resize((new_width, new_height), Image.Resampling.LANCZOS)
    left, top = int(round((new_width - size) / 2)), int(round((new_height - size) / 2))
    cropped = rgb.crop((left, top, left + size, top + size))
    return np.asarray(cropped, dtype=np.uint8), notes  # (S, S, 3)


def decode_image(data: bytes) -> Image.Image:
    """Fully decodes one image (so truncation surfaces now) and applies its EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.getexif().get(0x0112, 1) != 1:  # 0x0112: EXIF orientation
        img = ImageOps.exif_transpose(img)
    return img


def open_image(data: bytes, named_as_image: bool) -> tuple[Image.Image | None, CaptionProblem | None]:
    """(image, None), fully decoded, or (None, (report reason, detail)): "decompression bomb", "corrupt" (damaged
    data, or undecodable bytes named like an image) or "non-image". PIL raises many exception types on damaged
    data; every one is a reason here, never a crash."""
    try:  # identify from the header first
        Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return None, ("decompression bomb", str(err))
    except UnidentifiedImageError:
        return None, ("corrupt", "not decodable as an image") if named_as_image else ("non-image", None)
    except Exception as err:
        return None, ("corrupt", str(err))
    try:
        return decode_image(data), None
    except Image.DecompressionBombError as err:
        return None, ("decompression bomb", str(err))
    except Exception as err:  # truncated or damaged data
        return None, ("corrupt", str(err))


def readable_image_extensions() -> set[str]:
    """Every file extension PIL can open (".png", ".webp", ...)."""
    Image.init()  # registers every plugin, so OPEN lists all readable formats
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _load_for_build(path: str) -> Image.Image:
    try:
        return decode_image(Path(path).read_bytes())
    except Exception as err:  # the scan accepted it, so the file changed under us
        raise RuntimeError(f"{path} no longer decodes ({err}); it changed during the build, rerun") from err


# ---------------------------------------------------------------------------------------------- scanning


def normalize_caption(text: str) -> str:
    return " ".join(text.split())


def _source_name(root: Path, path: Path) -> str:
    """The example's ``source``: its path relative to the folder (POSIX), or absolute if outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def split_position(source: str, seed: int) -> float:
    """Where a path falls in [0, 1), from a salted hash of the path alone."""
    digest = hashlib.sha256(f"{seed}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(source: str, validation_fraction: float, seed: int) -> str:
    """``"validation"`` or ``"train"`` from a hash of the path alone, so adding files moves no others."""
    return "validation" if split_position(source, seed) < validation_fraction else "train"


def assign_splits(sources: list[str], validation_fraction: float, seed: int) -> list[str]:
    """`assign_split` for every source, except that a non-zero fraction always gives validation at least one
    image (the one whose hash comes first): a small folder would otherwise build without one and fail in training.
    """
    splits = [assign_split(source, validation_fraction, seed) for source in sources]
    if validation_fraction > 0 and sources and "validation" not in splits:
        if len(sources) < 2:
            raise FolderInputError(f"only {len(sources)} usable image: training needs one for validation and at "
                                   "least one to train on; add images (or pass --validation-fraction 0 to build "
                                   "a train split alone)")
        first = min(range(len(sources)), key=lambda i: split_position(sources[i], seed))
        splits[first] = "validation"
    return splits


def _resolve_manifest(spec: FolderSpec) -> Path:
    manifest = Path(spec.manifest).expanduser()
    candidates = [manifest] if manifest.is_absolute() else [manifest, Path(spec.source) / manifest]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"manifest {tried} not found; pass --manifest the path of a JSONL ({{\"path\": ..., \"caption\": ...}}"
        " per line) or TSV (path<TAB>caption) file, or leave it out to use name.txt captions beside images"
    )


def _resolve_source(spec: FolderSpec) -> Path:
    root = Path(spec.source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source folder {root} does not exist; pass the folder that holds your images")
    if not root.is_dir():
        raise NotADirectoryError(
            f"source {root} is not a directory; pass the folder that holds your images "
            "(a caption list goes in --manifest)"
        )
    return root.resolve()


def _walk_sorted(root: Path, report: BuildReport) -> list[Path]:
    """Every file under ``root`` sorted by relative path; hidden entries are reported, not entered."""
    files, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        base, real = Path(dirpath), os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to one folder: its files are already in
            report.skip("repeated folder link", _source_name(root, base) + "/", f"links to {real}")
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        for name in dirnames:
            if name.startswith("."):
                report.skip("hidden", _source_name(root, base / name) + "/")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                report.skip("hidden", _source_name(root, base / name))
            elif _is_special(base / name):  # reading a FIFO named x.png would wait forever
                report.skip("not a regular file", _source_name(root, base / name), "a pipe, socket or device")
            else:
                files.append(base / name)
    return sorted(files, key=lambda p: _source_name(root, p))


def _is_special(path: Path) -> bool:
    """A FIFO, socket or device (a dangling link is not: reading it fails at once and is reported then)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)



def _read_sidecar(path: Path) -> tuple[str | None, CaptionProblem | None]:
    """(caption, None) or (None, problem) for the ``name.txt`` beside an image."""
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        return None, ("missing caption", None)
    try:
        caption = normalize_caption(caption_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        detail = f"{caption_path.name} is not UTF-8 (byte {err.start}); save it as UTF-8"
        return None, ("unreadable caption", detail)
    except OSError as err:  # no permission
        return None, ("unreadable caption", str(err.strerror or err))
    return (caption, None) if caption else (None, ("missing caption", f"{caption_path.name} is empty"))


def _manifest_entries(manifest: Path, report: BuildReport) -> list[tuple[Path, str | None, CaptionProblem | None]]:
    """Parses the manifest into (image path, caption or None, problem) rows; bad lines go to the report."""
    name = manifest.name
    try:
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise FolderInputError(f"manifest {manifest} is not UTF-8 text ({err}); save it as UTF-8") from err
    first = next((line.strip() for line in lines if line.strip()), "")
    is_jsonl = manifest.suffix.lower() in (".jsonl", ".ndjson", ".json") or (
        manifest.suffix.lower() not in (".tsv", ".txt") and first.startswith("{")
    )
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{line_number}"
        if is_jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip("malformed manifest line", where, f"invalid JSON ({err.msg})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not isinstance(
                record.get("caption", ""), str
            ):
                report.skip("malformed manifest line", where, 'expected {"path": str, "caption": str}')
                continue
            raw_path, caption = record["path"], record.get("caption")
        else:
            if "\t" not in line:
                report.skip("malformed manifest line", where, "expected path<TAB>caption")
                continue
            raw_path, caption = line.split("\t", 1)
            if line_number == 1 and (raw_path.strip().lower(), caption.strip().lower()) == ("path", "caption"):
                continue  # a header row
        path = Path(raw_path.strip()).expanduser()
        # Absolute but not resolved: a symlinked image keeps its own name as its source.
        path = Path(os.path.normpath(path if path.is_absolute() else manifest.parent / path))
        if not path.is_file():
            report.skip("missing file", f"{where}: {raw_path.strip()}", "no such file")
            continue
        caption = normalize_caption(caption) if caption is not None else ""
        rows.append((path, caption or None, None if caption else ("missing caption", None)))
    return rows


def scan_folder(spec: FolderSpec, progress: bool = False) -> tuple[list[CaptionedImage], BuildReport]:
    """Runs every file-level check: finds images, reads captions, fully decodes each image once.

    Returns:
        The usable (absolute path, caption) pairs in a deterministic order, and the report (kept, splits,
        skipped, converted and upscaled already filled in).

    Raises:
        FileNotFoundError / NotADirectoryError: the source folder or the manifest is not there.
    """
    root = _resolve_source(spec)
    report = BuildReport()
    image_extensions = readable_image_extensions()
    if spec.manifest is not None:
        candidates = _manifest_entries(_resolve_manifest(spec), report)
    else:
        files = _walk_sorted(root, report)
        image_stems = {p.with_suffix("") for p in files if p.suffix.lower() != ".txt"}
        candidates = []
        for path in files:
            if path.suffix.lower() == ".txt":  # a caption; report it only if no file shares its stem
                if path.with_suffix("") not in image_stems:
                    report.skip("orphan caption", _source_name(root, path), "no image with this stem")
                continue
            candidates.append((path, *_read_sidecar(path)))

    # Splits are listed up front so the report shows an empty one; the fingerprint covers the kept files'
    # names, captions and bytes (the config name already covers the spec).
    report.splits = {"train": 0, **({"validation": 0} if spec.validation_fraction > 0 else {})}
    items, fingerprint = [], hashlib.sha256()
    for path, caption, caption_problem in tqdm(candidates, desc="scanning", unit="file", disable=not progress):
        source = _source_name(root, path)
        try:
            data = path.read_bytes()
        except OSError as err:  # a dangling symlink, no permission
            report.skip("unreadable file", source, str(err))
            continue
        img, problem = open_image(data, path.suffix.lower() in image_extensions)
        if problem is None and caption_problem is not None:  # a non-image is not "missing a caption"
            problem = caption_problem
        if problem is not None:
            report.skip(problem[0], source, problem[1])
            continue
        report.keep(source, img, spec.image_size)
        items.append(CaptionedImage(str(path), caption))
        fingerprint.update(f"{source}\0{caption}\0".encode() + hashlib.sha256(data).digest())
    for split in assign_splits([_source_name(root, Path(item.path)) for item in items], spec.validation_fraction,
                               spec.seed):
        report.splits[split] += 1
    report.kept = len(items)
    report.fingerprint = fingerprint.hexdigest()
    return items, report


# ------------------------------------------------------------------------------------------ TFDS builder


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """Carries the whole FolderSpec (source and manifest as absolute paths)."""

    source: str = ""
    image_size: int = 64
    manifest: str | None = None
    validation_fraction: float = 0.05
    seed: int = 0

    def spec(self) -> FolderSpec:
        return FolderSpec(self.source, self.image_size, self.manifest, self.validation_fraction, self.seed)


def folder_config(spec: FolderSpec) -> FolderConfig:
    """The builder config for ``spec``; its name hashes every field so different sources never collide."""
    source = str(_resolve_source(spec))
    manifest = str(_resolve_manifest(spec)) if spec.manifest is not None else None
    key = json.dumps([source, spec.image_size, manifest, spec.validation_fraction, spec.seed])
    slug = re.sub(r"[^a-z0-9]+", "_", Path(source).name.lower()).strip("_")[:32] or "folder"
    return FolderConfig(
        name=f"{slug}_{spec.image_size}px_{hashlib.sha256(key.encode()).hexdigest()[:10]}",
        description=f"{spec.image_size}x{spec.image_size} images with captions from {source}"
        + (f" (manifest {manifest})" if manifest else ""),
        source=source,
        image_size=spec.image_size,
        manifest=manifest,
        validation_fraction=spec.validation_fraction,
        seed=spec.seed,
    )


def example_features(image_size: int) -> tfds.features.FeaturesDict:
    """The schema of a user's dataset (folder or shards): the common image/caption/id plus ``source``, where the
    example came from (a path in the folder, or ``shard:key``)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8),
        "caption": tfds.features.Text(),
        "id": tfds.features.Scalar(dtype=np.int64),
        "source": tfds.features.Text(),
    })


class CaptionedFolder(tfds.core.GeneratorBasedBuilder):
    """Images + captions from a local folder, in the common schema plus ``source`` (relative path)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, items: list[CaptionedImage] | None = None, **kwargs: Any):
        self._items = items  # from build_folder's scan; None means scan again here
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=example_features(size),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        spec = self.builder_config.spec()
        items = self._items if self._items is not None else scan_folder(spec)[0]
        by_split: dict[str, list[tuple[int, CaptionedImage, str]]] = {"train": [], "validation": []}
        sources = [_source_name(Path(spec.source), Path(item.path)) for item in items]
        splits = assign_splits(sources, spec.validation_fraction, spec.seed)
        for example_id, (item, source, split) in enumerate(zip(items, sources, splits, strict=True)):
            by_split[split].append((example_id, item, source))  # ids follow the sorted scan order, across splits
        # TFDS refuses to write an empty split; the report still shows it with count 0.
        return {split: self._generate_examples(rows) for split, rows in by_split.items() if rows}

    def _generate_examples(self, rows: list[tuple[int, CaptionedImage, str]]) -> Iterator[tuple[int, dict]]:
        size = self.builder_config.image_size
        for example_id, item, source in rows:
            image, _ = preprocess_image(_load_for_build(item.path), size)
            yield example_id, {"image": image, "caption": item.caption, "id": example_id, "source": source}


def build_folder(
    data_dir: str, spec: FolderSpec, *, overwrite: bool = False, verbose: bool = False
) -> tuple[str, BuildReport]:
    """Scans ``spec.source``, writes the TFDS dataset and ``build_report.json``; returns the version dir.

    A dataset already built from identical files is reused. One built from a folder that has since
    changed is an error unless ``overwrite`` (the config name hashes the spec, not the folder's contents).

    Raises:
        FileNotFoundError / NotADirectoryError: the source folder or manifest is not there.
        FolderInputError: no usable image was found (the message lists what was found instead).
        FileExistsError: a stale build of this spec exists and ``overwrite`` is False.
    """
    items, report = scan_folder(spec, progress=verbose)
    if not items:
        found = report.skipped_counts().replace("none", "no files at all")
        raise FolderInputError(
            f"no usable images in {Path(spec.source).expanduser()} (found {found}). Each image needs a "
            "non-empty caption: a name.txt beside name.jpg, or a line in a --manifest file"
        )
    config = folder_config(spec)
    make_builder = lambda: CaptionedFolder(
        data_dir=data_dir, config=config, file_format="array_record", items=items
    )
    builder = make_builder()
    version_dir = os.path.abspath(builder.data_dir)
    report_path = Path(version_dir) / REPORT_FILENAME
    if (Path(version_dir) / "dataset_info.json").exists():
        previous = json.loads(report_path.read_text()).get("fingerprint") if report_path.exists() else None
        if previous == report.fingerprint:
            if verbose:
                print(f"{version_dir} is already built from these files; reusing it")
                print_report(report, version_dir)
            return version_dir, report
        if not overwrite:
            raise FileExistsError(
                f"{version_dir} holds a build of {spec.source} from other files (or with no "
                f"{REPORT_FILENAME}); pass --overwrite "
                "(overwrite=True) to rebuild it, or delete that directory"
            )
        shutil.rmtree(version_dir)
        builder = make_builder()
    builder.download_and_prepare()
    report_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if verbose:
        print_report(report, version_dir)
    return version_dir, report


def print_report(report: BuildReport, version_dir: str) -> None:
    for line in report.file_lines(limit=_PER_CATEGORY_LIST_LIMIT):
        print(line)
    print(f"wrote {version_dir} (report: {REPORT_FILENAME})")
    print(report.summary())
