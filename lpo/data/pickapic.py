"""Pick-a-Pic v1 preference pairs in parquet: schema, row checks, writer and download (docs/method.md section 2).

Both worlds store pairs in this schema: the real Pick-a-Pic parquet files from the hub (or a local mirror), and
the shapes world's simulated pairs (`write_pairs`). Everything downstream reads them through `iter_rows`.

Schema (one row = one pair of images for one caption):
- required by every reader: ``caption`` (str), ``jpg_0``/``jpg_1`` (JPEG bytes), ``label_0``/``label_1``
  (floats; (1, 0), (0, 1) or (0.5, 0.5) for a tie);
- Pick-a-Pic ids, required by `write_pairs`, optional for readers: ``ranking_id``, ``image_0_uid``,
  ``image_1_uid``, ``best_image_uid``, ``are_different``, ``has_label``;
- ``split``: our column (train / val / test). Hub files have none: their split is the file-name prefix
  (``validation_unique-00000-of-00001-<hash>.parquet``);
- optional auxiliary scores for MPCF, all six or none: ``aux_aesthetic_0/1``, ``aux_clip_0/1``, ``aux_vqa_0/1``.

Bad input: a missing column is an error naming the file and the column (`validate_table`); a bad row is
skipped and counted by reason (`iter_rows`), the first few of each reason logged with file and row.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lpo.config import DownloadConfig
from lpo.utils import atomic_dir, write_json

log = logging.getLogger(__name__)

CORE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
ID_COLUMNS = ("ranking_id", "image_0_uid", "image_1_uid", "best_image_uid", "are_different", "has_label")
AUX_SCORERS = ("aesthetic", "clip", "vqa")
AUX_COLUMNS = tuple(f"aux_{name}_{i}" for name in AUX_SCORERS for i in (0, 1))

# The only labels a pair may carry: image 0 wins, image 1 wins, tie.
VALID_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}

# Split names found in files (our column or the hub's file-name prefix) -> the split the pipeline uses.
SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "test": "test",
    "validation_unique": "val",
    "test_unique": "test",
}

# Arrow types of the columns `write_pairs` writes (readers accept any compatible numeric/string type).
PAIR_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("ranking_id", pa.int64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("best_image_uid", pa.string()),
        ("are_different", pa.bool_()),
        ("has_label", pa.bool_()),
        ("split", pa.string()),
    ]
    + [(name, pa.float64()) for name in AUX_COLUMNS]
)

# Skip reasons counted by `iter_rows` (the Counter may also hold "rows" and "kept").
SKIP_REASONS = ("no_label", "bad_label", "empty_caption", "identical_images", "corrupt_jpeg", "tie_dropped")
_LOG_FIRST_N = 5  # skipped rows logged individually per reason and call; the rest are only counted


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and the column or row)."""


class DownloadError(RuntimeError):
    """A Pick-a-Pic source (mirror folder or hub repo) that cannot be read."""


@dataclass
class PairRow:
    """One valid pair, as `iter_rows` yields it."""

    key: str  # unique sample key, no dots (WebDataset splits keys at the first dot): <file stem>-r<row>
    caption: str
    jpg_0: bytes
    jpg_1: bytes
    label_0: float
    label_1: float
    split: str  # train / val / test (mapped through SPLIT_NAMES)
    source: str  # "<file> row <i>", for messages
    aux: Optional[dict[str, float]] = None  # AUX_COLUMNS -> score, None when the file has no aux columns
    ranking_id: Optional[int] = None
    image_0: Optional[Image.Image] = field(default=None, repr=False)  # decoded RGB when iter_rows(decode=True)
    image_1: Optional[Image.Image] = field(default=None, repr=False)

    @property
    def is_tie(self) -> bool:
        return self.label_0 == self.label_1


# --------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------


def split_from_filename(path: str | Path) -> Optional[str]:
    """The split a hub-style file name implies (``test_unique-00000-of-00001-x.parquet`` -> "test"), or None."""
    prefix = re.split(r"[-.]", Path(path).name, maxsplit=1)[0]
    return SPLIT_NAMES.get(prefix)


def has_aux(schema: pa.Schema) -> bool:
    """Whether a (validated) file carries the MPCF auxiliary scores."""
    return all(name in schema.names for name in AUX_COLUMNS)


def validate_table(table: pa.Table | pa.Schema, path: str | Path) -> None:
    """Check a Pick-a-Pic table (or its schema) has the columns readers need; raise DataError naming `path`."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    names = set(schema.names)
    for name in CORE_COLUMNS:
        if name not in names:
            raise DataError(
                f"{path}: missing column {name!r} (a Pick-a-Pic pair file needs {', '.join(CORE_COLUMNS)}; "
                f"found {', '.join(schema.names)})"
            )
    expected = {
        "caption": (pa.types.is_string, pa.types.is_large_string),
        "jpg_0": (pa.types.is_binary, pa.types.is_large_binary),
        "jpg_1": (pa.types.is_binary, pa.types.is_large_binary),
        "label_0": (pa.types.is_floating, pa.types.is_integer),
        "label_1": (pa.types.is_floating, pa.types.is_integer),
        "split": (pa.types.is_string, pa.types.is_large_string),
        **{name: (pa.types.is_floating, pa.types.is_integer) for name in AUX_COLUMNS},
    }
    for name, checks in expected.items():
        if name in names and not any(check(schema.field(name).type) for check in checks):
            raise DataError(f"{path}: column {name!r} has type {schema.field(name).type}, which does not fit")
    present_aux = [name for name in AUX_COLUMNS if name in names]
    if present_aux and len(present_aux) != len(AUX_COLUMNS):
        missing = [name for name in AUX_COLUMNS if name not in names]
        raise DataError(f"{path}: aux columns come all six or none; missing column {missing[0]!r}")
    if "split" not in names and split_from_filename(path) is None:
        raise DataError(
            f"{path}: missing column 'split', and the file name does not start with a split name "
            f"({', '.join(SPLIT_NAMES)})"
        )


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None


def count_rows_by_split(paths: Iterable[str | Path]) -> dict[str, int]:
    """Rows per split before any check (parquet metadata, or only the `split` column), for progress and sizing."""
    counts: Counter = Counter()
    for path in map(Path, paths):
        schema = _read_schema(path)
        validate_table(schema, path)
        if "split" in schema.names:
            column = pq.read_table(path, columns=["split"]).column("split").to_pylist()
            for raw, n in Counter(column).items():
                counts[_canonical_split(raw, path)] += n
        else:
            counts[split_from_filename(path)] += pq.ParquetFile(path).metadata.num_rows
    return dict(counts)


def _canonical_split(raw: Optional[str], path: Path) -> str:
    if raw not in SPLIT_NAMES:
        raise DataError(f"{path}: unknown split {raw!r} (known: {', '.join(SPLIT_NAMES)})")
    return SPLIT_NAMES[raw]


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def _decode_jpeg(data: bytes) -> Image.Image:
    """Fully decode (so truncated files fail here, not later) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def _check_row(row: dict, keep_ties: bool) -> Optional[str]:
    """The skip reason of a row before decoding its images, or None if it passes (cheap checks first)."""
    if row.get("has_label") is False:
        return "no_label"
    try:
        labels = (float(row["label_0"]), float(row["label_1"]))
    except (TypeError, ValueError):
        return "bad_label"
    if labels not in VALID_LABELS:  # NaN never compares equal, so it lands here too
        return "bad_label"
    caption = row["caption"]
    if caption is None or not caption.strip():
        return "empty_caption"
    if not row["jpg_0"] or not row["jpg_1"]:
        return "corrupt_jpeg"
    if row["jpg_0"] == row["jpg_1"] or row.get("are_different") is False:
        return "identical_images"
    if labels[0] == labels[1] and not keep_ties:
        return "tie_dropped"
    return None


def _safe_key(stem: str, index: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) + f"-r{index:07d}"


def iter_rows(
    paths: Iterable[str | Path],
    *,
    split: Optional[str] = None,
    keep_ties: bool = True,
    decode: bool = True,
    stats: Optional[Counter] = None,
    batch_rows: int = 256,
) -> Iterator[PairRow]:
    """Yield the valid pairs of Pick-a-Pic parquet files, skipping and counting bad rows.

    split: only rows of this split (train / val / test); None = all. keep_ties: yield tie pairs (else they are
    skipped as "tie_dropped"). decode: fully decode both JPEGs (so a corrupt one is skipped here) and attach
    them as RGB images. stats: a Counter that receives "rows" (of the split), "kept", "ties_kept" and one
    count per skip reason (SKIP_REASONS). Files are read in `batch_rows` chunks to bound memory.
    """
    stats = Counter() if stats is None else stats
    logged: Counter = Counter()
    for path in map(Path, paths):
        schema = _read_schema(path)
        validate_table(schema, path)
        file_split = None if "split" in schema.names else split_from_filename(path)
        if split is not None and file_split is not None and file_split != split:
            continue
        aux = has_aux(schema)
        wanted = [c for c in (*CORE_COLUMNS, *ID_COLUMNS, "split", *AUX_COLUMNS) if c in schema.names]
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=wanted):
            for row in batch.to_pylist():
                i, index = index, index + 1
                row_split = file_split if file_split is not None else _canonical_split(row["split"], path)
                if split is not None and row_split != split:
                    continue
                stats["rows"] += 1
                reason = _check_row(row, keep_ties)
                detail = ""
                images: tuple[Optional[Image.Image], Optional[Image.Image]] = (None, None)
                if reason is None and decode:
                    try:
                        images = (_decode_jpeg(row["jpg_0"]), _decode_jpeg(row["jpg_1"]))
                    except Exception as err:  # PIL raises several types for bad bytes; all mean "corrupt"
                        reason, detail = "corrupt_jpeg", f" ({type(err).__name__}: {err})"
                if reason is not None:
                    stats[reason] += 1
                    logged[reason] += 1
                    if logged[reason] <= _LOG_FIRST_N:
                        log.warning("%s row %d: skipped, %s%s", path, i, reason, detail)
                    if logged[reason] == _LOG_FIRST_N:
                        log.warning("further rows skipped for %s are only counted", reason)
                    continue
                stats["kept"] += 1
                tie = row["label_0"] == row["label_1"]
                stats["ties_kept"] += int(tie)
                yield PairRow(
                    key=_safe_key(path.stem, i),
                    caption=row["caption"],
                    jpg_0=row["jpg_0"],
                    jpg_1=row["jpg_1"],
                    label_0=float(row["label_0"]),
                    label_1=float(row["label_1"]),
                    split=row_split,
                    source=f"{path} row {i}",
                    aux={name: _aux_value(row[name]) for name in AUX_COLUMNS} if aux else None,
                    ranking_id=row.get("ranking_id"),
                    image_0=images[0],
                    image_1=images[1],
                )


def _aux_value(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)  # a missing score fails every MPCF rule


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """Write a parquet file atomically (temp name + rename), so a killed writer leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_pairs(path: str | Path, rows: Iterable[dict]) -> int:
    """Write pair rows (dicts) in the Pick-a-Pic schema; returns the row count.

    Every row needs CORE_COLUMNS, ID_COLUMNS and ``split`` (train / val / test), plus either all six
    AUX_COLUMNS or none (the same for every row). Unknown keys and missing keys raise DataError.
    """
    rows = list(rows)
    required = (*CORE_COLUMNS, *ID_COLUMNS, "split")
    with_aux = bool(rows) and AUX_COLUMNS[0] in rows[0]
    columns = required + (AUX_COLUMNS if with_aux else ())
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        unknown = sorted(set(row) - set(columns))
        if missing or unknown:
            what = f"missing key {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
            raise DataError(f"{path}: row {i}: {what} (aux columns: all six in every row or in none)")
        if row["split"] not in ("train", "val", "test"):
            raise DataError(f"{path}: row {i}: split {row['split']!r} is not train, val or test")
    schema = pa.schema([PAIR_SCHEMA.field(c) for c in columns])
    table = pa.Table.from_pylist(rows, schema=schema)
    write_parquet(path, table)
    return len(rows)


# --------------------------------------------------------------------------------------------------------
# Download (local mirror or the Hugging Face hub)
# --------------------------------------------------------------------------------------------------------


def _split_pattern(split: str) -> str:
    return f"{split}-*.parquet"


def _matches_split(name: str, split: str) -> bool:
    # "validation-*" must not match "validation_unique-*": the split name is followed by "-" or ".parquet".
    return fnmatch.fnmatch(name, _split_pattern(split)) or name == f"{split}.parquet"


def _mirror_files(mirror: Path, splits: list[str]) -> dict[str, list[Path]]:
    if not mirror.is_dir():
        raise DownloadError(f"download.mirror: {mirror} is not a folder (a local folder of Pick-a-Pic parquet files)")
    found = sorted(mirror.rglob("*.parquet"))
    out: dict[str, list[Path]] = {}
    for split in splits:
        files = [p for p in found if _matches_split(p.name, split)]
        if not files:
            raise DownloadError(
                f"download.mirror: {mirror} has no parquet file of split {split!r} "
                f"(expected {_split_pattern(split)} or {split}.parquet; found {len(found)} parquet files)"
            )
        out[split] = files
    return out


def _hub_call(cfg: DownloadConfig, **kwargs):
    """snapshot_download with every failure turned into one DownloadError that names the repo."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(cfg.repo_id, repo_type="dataset", revision=cfg.revision, **kwargs)
    except Exception as err:  # offline, unknown repo/revision, gated, network: all end the stage the same way
        raise DownloadError(
            f"download.repo_id: cannot fetch dataset {cfg.repo_id!r} (revision {cfg.revision or 'main'}) from the "
            f"Hugging Face hub: {type(err).__name__}: {err}. Pick-a-Pic v1/v2 left their original ids; set "
            f"download.mirror to a local folder of parquet files, or HF_HUB_OFFLINE=0 to allow the network."
        ) from err


def _hub_files(cfg: DownloadConfig, splits: list[str]) -> dict[str, list[Path]]:
    """Download only the needed split files (resumable: the hub cache keeps finished and partial files)."""
    patterns = [f"data/{_split_pattern(s)}" for s in splits] + [f"{_split_pattern(s)}" for s in splits]
    out: dict[str, list[Path]] = {}
    if cfg.max_pairs is None:
        root = Path(_hub_call(cfg, allow_patterns=patterns))
        files = sorted(root.rglob("*.parquet"))
        out = {s: [p for p in files if _matches_split(p.name, s)] for s in splits}
    else:
        # With a row cap, fetch one file at a time (in name order) until the split has enough rows.
        listing = sorted(info.filename for info in _hub_call(cfg, allow_patterns=patterns, dry_run=True))
        for split in splits:
            out[split], rows = [], 0
            for name in (n for n in listing if _matches_split(Path(n).name, split)):
                if rows >= cfg.max_pairs:
                    break
                path = Path(_hub_call(cfg, allow_patterns=[name])) / name
                out[split].append(path)
                rows += pq.ParquetFile(path).metadata.num_rows
    for split, files in out.items():
        if not files:
            raise DownloadError(f"download.repo_id: dataset {cfg.repo_id!r} has no parquet file of split {split!r}")
    return out


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (no second copy of a 190 GB dataset), else copy."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_pickapic(cfg: DownloadConfig, out_dir: str | Path) -> dict:
    """Fetch the configured Pick-a-Pic splits into `out_dir` and write out_dir/manifest.json.

    Source: `cfg.mirror` (a local folder; files found recursively by split name) when set, else the hub
    (`cfg.repo_id`, `cfg.revision`) via huggingface_hub.snapshot_download restricted to the split files.
    `cfg.max_pairs` caps the rows per split (the last file is cut). The folder is written atomically; the
    manifest lists every file with sha256, bytes, rows and split. Returns the manifest.
    """
    if cfg.mirror is None and cfg.repo_id is None:
        raise DownloadError("download: source 'pickapic' needs download.mirror (a local folder) or download.repo_id")
    unknown = [s for s in cfg.splits if s not in SPLIT_NAMES]
    if unknown:
        raise DownloadError(
            f"download.splits: {unknown[0]!r} is not a split the pipeline reads (known: {', '.join(SPLIT_NAMES)})"
        )
    if cfg.max_pairs is not None and cfg.max_pairs < 1:
        raise DownloadError(f"download.max_pairs: must be >= 1 or null, got {cfg.max_pairs}")
    sources = _mirror_files(Path(cfg.mirror), cfg.splits) if cfg.mirror else _hub_files(cfg, cfg.splits)
    out_dir = Path(out_dir)
    entries = []
    with atomic_dir(out_dir) as tmp:
        for split, files in sources.items():
            rows = 0
            for src in files:
                if cfg.max_pairs is not None and rows >= cfg.max_pairs:
                    break
                dst = tmp / src.name
                if dst.exists():
                    raise DownloadError(f"download: two source files are named {src.name} (second: {src})")
                n = pq.ParquetFile(src).metadata.num_rows
                if cfg.max_pairs is not None and rows + n > cfg.max_pairs:
                    n = cfg.max_pairs - rows
                    write_parquet(dst, pq.read_table(src).slice(0, n))
                else:
                    _place(src, dst)
                validate_table(pq.read_schema(dst), src)
                rows += n
                entries.append({
                    "name": dst.name, "split": split, "sha256": sha256_file(dst), "bytes": dst.stat().st_size, "rows": n,
                })
            log.info("split %s: %d files, %d rows", split, sum(e["split"] == split for e in entries), rows)
        manifest = {
            "source": "mirror" if cfg.mirror else "hub",
            "mirror": cfg.mirror,
            "repo_id": None if cfg.mirror else cfg.repo_id,
            "revision": None if cfg.mirror else cfg.revision,
            "max_pairs": cfg.max_pairs,
            "rows": {s: sum(e["rows"] for e in entries if e["split"] == s) for s in sources},
            "files": entries,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest
