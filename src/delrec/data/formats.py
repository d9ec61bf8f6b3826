"""Readers: each turns one raw dataset format into RawData, with errors that name file and line or field.

Formats (``--format``; each dataset has a default):

- ``movielens``: a MovieLens-100K folder (``u.data`` + ``u.item``) or MovieLens-1M folder
  (``ratings.dat`` + ``movies.dat``), as GroupLens publishes them. Both are latin-1.
- ``recbole``: RecBole atomic files ``X.inter`` (user_id, item_id, timestamp) + ``X.item`` (item_id,
  title), tab-separated with ``name:type`` headers -- how RUCAIBox publishes Amazon Beauty and Home &
  Kitchen. The source is the folder or the ``.inter`` file.
- ``amazon-json``: McAuley's ``reviews_X_5.json.gz`` (reviewerID, asin, unixReviewTime) + ``meta_X.json.gz``
  (asin, title), one record a line, JSON or Python dict literals (the 2014 meta files are the latter).
- ``steam``: Kang & McAuley's ``steam_reviews.json.gz`` (username or user_id, product_id, date) +
  ``steam_games.json.gz`` (id, title or app_name), Python dict literals one a line (JSON also read).
- ``sequences``: ``user_sequence.txt`` (``user item1 item2 ...``, oldest first, no timestamps: the
  position is the time) + a titles table (a RecBole ``.item`` file or a TSV with item id and title).
- ``llara``: LLaRA's session windows (Liao et al., 2024; its Steam, MovieLens and LastFM data):
  ``train*.jsonl``, ``valid*.jsonl``, ``test*.jsonl`` (one row a line: ``seq``, the most recent item ids
  right-padded, ``len_seq``, how many of them are real, and ``next``, the target) + ``id2name.txt``
  (``id::title``). Each row is its own user; the files say which users are train, valid and test
  (``--split given``).
- ``generic``: ``interactions.parquet|csv`` (user, item, timestamp) + ``items.parquet|csv`` (item, title).
- ``synthetic``: generated, see ``delrec.data.synthetic``.

Every format also reads a zip archive of its folder (extracted to a temporary folder), and a folder
that only wraps another folder is entered.
"""

from __future__ import annotations

import ast
import csv
import datetime as dt
import gzip
import json
import logging
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from delrec.data.download import unzip
from delrec.data.raw import RawData
from delrec.errors import DelrecError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Line-level reading with exact error positions


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text) of a plain or gzipped text file; decoding and truncation errors name the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as exc:
                    raise DelrecError(
                        f"not valid {encoding} text (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
                        path=f"{path}:{lineno}",
                    ) from None
                yield lineno, text
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DelrecError(f"truncated or corrupt gzip file after line {lineno} ({exc})", path=path) from None


def _locate_bad_line(
    path: Path,
    names: list[str],
    *,
    split: Callable[[str], list[str]],
    int_fields: tuple[str, ...] = (),
    encoding: str = "utf-8",
    header: bool = False,
) -> None:
    """Raise an error naming the first malformed line; the slow path, run only after a fast parse failed."""
    for lineno, line in _lines(path, encoding):
        text = line.rstrip("\r\n")
        if (header and lineno == 1) or not text.strip():
            continue
        parts = split(text)
        if len(parts) != len(names):
            raise DelrecError(
                f"expected {len(names)} fields ({', '.join(names)}), got {len(parts)}: {text[:80]!r}",
                path=f"{path}:{lineno}",
            )
        for name in int_fields:
            value = parts[names.index(name)].strip()
            try:
                int(value)
            except ValueError:
                raise DelrecError(
                    f"{name} {value!r} is not an integer", path=f"{path}:{lineno}", field=name
                ) from None


def _check_against_header(path: Path, delimiter: str, quoting: bool = True) -> Callable[[], None]:
    """An ``explain`` for :func:`_read_csv`: find the first line whose field count differs from the header's."""

    def split(line: str) -> list[str]:
        return next(
            csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE)
        )

    def explain() -> None:
        first = next(_lines(path), None)
        if first is None:
            raise DelrecError("empty file: expected a header line", path=path)
        _locate_bad_line(path, split(first[1].rstrip("\r\n")), split=split, header=True)

    return explain


def _read_csv(
    path: Path,
    *,
    delimiter: str,
    names: list[str] | None = None,
    types: Mapping[str, pa.DataType] | None = None,
    include: list[str] | None = None,
    quoting: bool = True,
    encoding: str = "utf-8",
    explain: Callable[[], None] | None = None,
) -> pa.Table:
    """Read a delimited file with pyarrow; on failure ``explain`` (or a generic message) names the problem."""
    try:
        return pacsv.read_csv(
            path,
            # use_threads=False: the threaded reader aborted the process ("terminate called without an
            # active exception") on an empty latin-1 file once torch was imported.
            read_options=pacsv.ReadOptions(
                column_names=names, encoding=encoding, block_size=1 << 24, use_threads=False
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False),
            convert_options=pacsv.ConvertOptions(
                column_types=dict(types or {}), include_columns=include, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError, UnicodeDecodeError) as exc:
        if explain is not None:
            explain()
        # Also finds an undecodable line (a decoding error carries no line number of its own).
        for _ in _lines(path, encoding):
            pass
        raise DelrecError(f"cannot parse ({exc})", path=path) from exc
    except OSError as exc:
        raise DelrecError(f"cannot read ({exc})", path=path) from exc


def _require_columns(table: pa.Table, columns: tuple[str, ...], path: Path, what: str) -> None:
    for name in columns:
        if name not in table.column_names:
            raise DelrecError(
                f"missing column; {what} needs {', '.join(columns)} (found: {', '.join(table.column_names)})",
                path=path,
                field=name,
            )


def _row_line(path: Path, row: int, *, header: bool, encoding: str = "utf-8") -> int:
    """The line number of data row ``row`` (0-based) of a delimited file, counted as pyarrow does
    (blank lines skipped, the header not a row); only run to name a bad row."""
    seen = -1
    for lineno, text in _lines(path, encoding):
        if (header and seen == -1 and lineno == 1) or not text.strip("\r\n"):
            continue
        seen += 1
        if seen == row:
            return lineno
    return 0


def _where(path: Path, row: int, text_file: bool, header: bool, encoding: str) -> str:
    if text_file:
        return f"{path}:{_row_line(path, row, header=header, encoding=encoding)}"
    return f"{path} (data row {row + 1})"


def check_values(
    table: pa.Table,
    path: Path,
    *,
    ids: tuple[str, ...] = (),
    times: tuple[str, ...] = (),
    text_file: bool = True,
    header: bool = True,
    encoding: str = "utf-8",
) -> None:
    """Refuse missing, empty or non-finite ids and timestamps, naming file, line (or row) and field.

    Ids must be integers or strings; timestamps numbers (or dates). Negative timestamps are allowed
    (dates before 1970) but counted in a warning: they are more often a broken export.
    """
    for name in (*ids, *times):
        column = table.column(name)
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = pc.cast(column, kind.value_type), kind.value_type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if name in ids and not (is_text or pa.types.is_integer(kind)):
            raise DelrecError(f"expected integer or string ids, got {kind}", path=path, field=name)
        if name in times and not (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_timestamp(kind)
            or pa.types.is_date(kind)
            or is_text
        ):
            raise DelrecError(f"expected numbers or dates, got {kind}", path=path, field=name)
        bad = pc.is_null(column, nan_is_null=True)
        if is_text:
            bad = pc.or_(bad, pc.equal(pc.utf8_trim_whitespace(column), ""))
        if pa.types.is_floating(kind):
            bad = pc.or_(bad, pc.invert(pc.is_finite(column)))
        if pc.any(bad).as_py():
            row = int(pc.index(bad, True).as_py())
            value = column[row].as_py()
            what = (
                "missing value (empty, NaN or NULL)"
                if value is None or (isinstance(value, str) and not value.strip())
                else f"not a finite value ({value!r})"
            )
            raise DelrecError(what, path=_where(path, row, text_file, header, encoding), field=name)
        if name in times and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            warn_negative(column.to_numpy(), path, name)


def warn_negative(values: np.ndarray, path: Path | str, name: str) -> None:
    """Log how many timestamps are negative (before 1970): allowed, but often a broken export."""
    negative = int((np.asarray(values) < 0).sum())
    if negative:
        log.warning("%s: %d negative %s value(s) (before 1970?)", path, negative, name)


def _strings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as a numpy array of str (ids are kept as text, whatever their type in the file)."""
    return np.asarray(pc.cast(column, pa.string()).to_numpy(zero_copy_only=False), dtype=str)


def _order_values(values: np.ndarray) -> np.ndarray:
    """Any sortable time values (floats, dates) as int64 ranks that keep their order and ties."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.unique(values, return_inverse=True)[1].astype(np.int64)


def _parse_record(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One record: strict JSON, else a Python dict literal (McAuley's 2014 meta and Steam files)."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DelrecError(
                f"not a JSON object or Python dict literal: {line[:80]!r}", path=f"{path}:{lineno}"
            ) from None
    if not isinstance(record, dict):
        raise DelrecError(f"expected an object, got {type(record).__name__}", path=f"{path}:{lineno}")
    return record


def _records(path: Path, desc: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in tqdm(_lines(path), desc=desc, unit=" lines", mininterval=2.0, leave=False):
        if line.strip():
            yield lineno, _parse_record(line, path, lineno)


def _field(record: Mapping[str, Any], name: str, path: Path, lineno: int) -> Any:
    """A record's id or time value: present, not blank, a string or a finite number."""
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DelrecError(f"record has no {name!r}", path=f"{path}:{lineno}", field=name)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DelrecError(
            f"expected a string or a number, got {type(value).__name__}", path=f"{path}:{lineno}", field=name
        )
    if isinstance(value, float) and not np.isfinite(value):  # JSON allows NaN and Infinity
        raise DelrecError(f"not a finite value ({value!r})", path=f"{path}:{lineno}", field=name)
    return value


def _find_one(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The single file in ``folder`` matching the first pattern that matches anything."""
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DelrecError(
                f"several {what} files ({names}): pass the one to use as the source", path=folder
            )
    raise DelrecError(f"no {what} file (looked for {' or '.join(patterns)})", path=folder)


# --------------------------------------------------------------------------------------------------
# MovieLens


def read_movielens(path: Path) -> RawData:
    """MovieLens-100K (u.data + u.item) or -1M (ratings.dat + movies.dat), from its folder."""
    if not path.is_dir():
        raise DelrecError("expected a MovieLens folder or zip archive", path=path)
    root = _movielens_root(path)
    if (root / "u.data").is_file():
        raw = _read_ml100k(root)
    else:
        raw = _read_ml1m(root)
    raw.source = str(path)
    return raw


def _movielens_root(path: Path) -> Path:
    """The folder holding the rating file: ``path`` itself or one level down (as inside the zips)."""
    for folder in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (folder / "u.data").is_file() or (folder / "ratings.dat").is_file():
            return folder
    raise DelrecError(
        "no MovieLens rating file: expected u.data + u.item (100K) or ratings.dat + movies.dat (1M)",
        path=path,
    )


def _movielens_ratings(path: Path, delimiter: str, split: Callable[[str], list[str]]) -> RawData:
    names = ["user", "item", "rating", "timestamp"]
    # "::" is read as ":" with empty columns in between (pyarrow takes one-character delimiters).
    wide = delimiter == ":"
    columns = ["user", "_1", "item", "_2", "rating", "_3", "timestamp"] if wide else names
    table = _read_csv(
        path,
        delimiter=delimiter,
        names=columns,
        types={"user": pa.int64(), "item": pa.int64(), "timestamp": pa.int64()},
        include=["user", "item", "timestamp"],
        quoting=False,
        encoding="latin-1",
        explain=lambda: _locate_bad_line(
            path, names, split=split, int_fields=("user", "item", "timestamp"), encoding="latin-1"
        ),
    )
    # pyarrow reads "", "NaN", "NULL" ... as null in an int64 column: refuse them, naming the line.
    check_values(table, path, ids=("user", "item"), times=("timestamp",), header=False, encoding="latin-1")
    return RawData(
        users=_strings(table.column("user")),
        items=_strings(table.column("item")),
        timestamps=table.column("timestamp").to_numpy(),
        titles={},
        domain="movies",
        source=str(path),
    )


def _movielens_titles(path: Path, sep: str, min_fields: int) -> dict[str, str]:
    titles = {}
    for lineno, line in _lines(path, "latin-1"):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        parts = text.split(sep)
        if len(parts) < min_fields or not parts[0].strip().isdigit():
            raise DelrecError(
                f"expected 'id{sep}title{sep}...' with at least {min_fields} fields: {text[:80]!r}",
                path=f"{path}:{lineno}",
            )
        titles[parts[0].strip()] = parts[1]
    return titles


def _read_ml100k(root: Path) -> RawData:
    data, item = root / "u.data", root / "u.item"
    if not item.is_file():
        raise DelrecError("missing file (MovieLens-100K needs u.data and u.item)", path=item)
    raw = _movielens_ratings(data, "\t", lambda line: line.split("\t"))
    raw.titles = _movielens_titles(item, "|", 3)  # id|title|release date|... (24 fields)
    return raw


def _read_ml1m(root: Path) -> RawData:
    data, item = root / "ratings.dat", root / "movies.dat"
    if not item.is_file():
        raise DelrecError("missing file (MovieLens-1M needs ratings.dat and movies.dat)", path=item)
    raw = _movielens_ratings(data, ":", lambda line: line.split("::"))
    raw.titles = _movielens_titles(item, "::", 3)  # id::title::genres
    return raw


# --------------------------------------------------------------------------------------------------
# RecBole atomic files and plain sequences


def _read_titles_table(path: Path, id_fields: tuple[str, ...]) -> dict[str, str]:
    """A tab-separated titles table with a header (RecBole ``name:type`` headers included).

    Read with a CSV reader: RecBole double-quotes titles that hold tabs or line breaks.
    """
    titles: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = [name.split(":")[0].strip() for name in next(reader, [])]
            id_col = next((header.index(f) for f in id_fields if f in header), None)
            if id_col is None:
                raise DelrecError(
                    f"no item id column (expected one of {', '.join(id_fields)}; header: {header})",
                    path=f"{path}:1",
                    field=id_fields[0],
                )
            if "title" not in header:
                raise DelrecError(f"no title column (header: {header})", path=f"{path}:1", field="title")
            title_col = header.index("title")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DelrecError(
                        f"expected {len(header)} tab-separated fields, got {len(row)}",
                        path=f"{path}:{reader.line_num}",
                    )
                titles[row[id_col]] = row[title_col]
    except UnicodeDecodeError:
        for _ in _lines(path):  # names the undecodable line
            pass
        raise
    except csv.Error as exc:
        raise DelrecError(f"malformed CSV ({exc})", path=path) from exc
    return titles


def read_recbole(path: Path) -> RawData:
    """RecBole atomic files: ``X.inter`` (user_id, item_id, timestamp) and ``X.item`` (item_id, title)."""
    if path.is_file():
        if path.suffix != ".inter":
            raise DelrecError(
                "expected a RecBole .inter file or a folder holding X.inter and X.item", path=path
            )
        inter = path
    else:
        inter = _find_one(path, ("*.inter",), "RecBole .inter")
    item = inter.with_suffix(".item")
    if not item.is_file():
        item = _find_one(inter.parent, ("*.item",), "RecBole .item")
    table = _read_csv(inter, delimiter="\t", quoting=False, explain=_check_against_header(inter, "\t", False))
    table = table.rename_columns([name.split(":")[0].strip() for name in table.column_names])
    _require_columns(table, ("user_id", "item_id"), inter, "a RecBole .inter file")
    has_time = "timestamp" in table.column_names
    check_values(table, inter, ids=("user_id", "item_id"), times=("timestamp",) if has_time else ())
    if has_time:
        column = table.column("timestamp")
        if not pa.types.is_integer(column.type) and not pa.types.is_floating(column.type):
            raise DelrecError(f"timestamps must be numbers, got {column.type}", path=inter, field="timestamp")
        times = _order_values(column.to_numpy())
    else:
        log.warning("%s has no timestamp column: using the file order", inter)
        times = np.arange(table.num_rows, dtype=np.int64)
    return RawData(
        users=_strings(table.column("user_id")),
        items=_strings(table.column("item_id")),
        timestamps=times,
        titles=_read_titles_table(item, ("item_id",)),
        domain="products",
        source=str(inter),
    )


def read_sequences(path: Path) -> RawData:
    """``user_sequence.txt`` (``user item1 item2 ...``, oldest first) plus a titles table."""
    seq_file = path if path.is_file() else path / "user_sequence.txt"
    if not seq_file.is_file():
        raise DelrecError("missing file (format 'sequences' needs user_sequence.txt)", path=seq_file)
    folder = seq_file.parent
    titles_file = next(iter(sorted(folder.glob("*.item"))), None) or folder / "item_titles.tsv"
    if not titles_file.is_file():
        raise DelrecError("no titles file (expected a RecBole X.item or item_titles.tsv)", path=folder)
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, line in _lines(seq_file):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DelrecError(
                "expected 'user item1 item2 ...', got a user with no items", path=f"{seq_file}:{lineno}"
            )
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
        times.extend(range(len(parts) - 1))
    return RawData(
        users=np.array(users, dtype=str),
        items=np.array(items, dtype=str),
        timestamps=np.array(times, dtype=np.int64),
        titles=_read_titles_table(titles_file, ("item_id", "asin", "item", "id")),
        domain="products",
        source=str(seq_file),
    )


# --------------------------------------------------------------------------------------------------
# McAuley's JSON dumps: Amazon reviews and Steam


def _pair_files(path: Path, main: tuple[str, ...], meta: tuple[str, ...], what: str) -> tuple[Path, Path]:
    folder = path.parent if path.is_file() else path
    main_file = path if path.is_file() else _find_one(folder, main, f"{what} review")
    return main_file, _find_one(folder, meta, f"{what} metadata")


def read_amazon_json(path: Path) -> RawData:
    """McAuley's Amazon ``reviews_X_5.json.gz`` + ``meta_X.json.gz`` (the folder or the reviews file)."""
    reviews, meta = _pair_files(path, ("reviews_*.json*", "*_5.json*"), ("meta_*.json*",), "Amazon")
    users, items, times = [], [], []
    for lineno, record in _records(reviews, reviews.name):
        users.append(str(_field(record, "reviewerID", reviews, lineno)))
        items.append(str(_field(record, "asin", reviews, lineno)))
        stamp = _field(record, "unixReviewTime", reviews, lineno)
        if not isinstance(stamp, int | float) or abs(stamp) >= 2**63:  # times are stored as int64
            raise DelrecError(
                f"expected a Unix time in seconds, got {stamp!r}",
                path=f"{reviews}:{lineno}",
                field="unixReviewTime",
            )
        times.append(int(stamp))
    warn_negative(np.array(times, dtype=np.int64), reviews, "unixReviewTime")
    titles = {}
    for lineno, record in _records(meta, meta.name):
        asin = _field(record, "asin", meta, lineno)
        title = record.get("title")
        if isinstance(title, str):  # many 2014 meta records have no title: their items are dropped
            titles[str(asin)] = title
    return RawData(
        users=np.array(users, dtype=str),
        items=np.array(items, dtype=str),
        timestamps=np.array(times, dtype=np.int64),
        titles=titles,
        domain="products",
        source=str(reviews),
    )


def read_steam(path: Path) -> RawData:
    """Kang & McAuley's ``steam_reviews.json.gz`` + ``steam_games.json.gz`` (the folder or the reviews file)."""
    reviews, games = _pair_files(path, ("*reviews*.json*",), ("*games*.json*",), "Steam")
    users, items, times = [], [], []
    for lineno, record in _records(reviews, reviews.name):
        # user_id is present for only some reviews; username is the id SASRec's preprocessing uses.
        user = record.get("user_id") or _field(record, "username", reviews, lineno)
        users.append(str(user))
        items.append(str(_field(record, "product_id", reviews, lineno)))
        date = _field(record, "date", reviews, lineno)
        try:
            times.append(dt.date.fromisoformat(str(date)).toordinal())
        except ValueError:
            raise DelrecError(
                f"expected a date YYYY-MM-DD, got {date!r}", path=f"{reviews}:{lineno}", field="date"
            ) from None
    titles = {}
    for _, record in _records(games, games.name):
        game_id, title = record.get("id"), record.get("title") or record.get("app_name")
        if game_id is not None and isinstance(title, str):  # a few records have no id or name
            titles[str(game_id)] = title
    return RawData(
        users=np.array(users, dtype=str),
        items=np.array(items, dtype=str),
        timestamps=np.array(times, dtype=np.int64),
        titles=titles,
        domain="games",
        source=str(reviews),
    )


# --------------------------------------------------------------------------------------------------
# LLaRA's session windows

LLARA_SPLITS = ("train", "valid", "test")


def _llara_ids(value: Any, path: Path, lineno: int, name: str, *, many: bool) -> list[int]:
    """``seq`` (a list of integer ids, ``many``) or ``next`` (one integer id) of a LLaRA row."""
    values = value if many and isinstance(value, list) else [value]
    if (many and not isinstance(value, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        what = "a list of integer item ids" if many else "an integer item id"
        raise DelrecError(f"expected {what}, got {value!r}", path=f"{path}:{lineno}", field=name)
    return values


def read_llara(path: Path) -> RawData:
    """LLaRA's ``train|valid|test*.jsonl`` windows + ``id2name.txt``; each row is one user.

    A row's items are ``seq[:len_seq]`` then ``next`` (positions are the time). Ids without a title
    (LLaRA pads with the id one past the last title) are dropped later with the untitled items.
    """
    folder = path.parent if path.is_file() else path
    names_file = folder / "id2name.txt"
    if not names_file.is_file():
        raise DelrecError("missing file (format 'llara' needs id2name.txt: id::title)", path=names_file)
    titles: dict[str, str] = {}
    for lineno, line in _lines(names_file):
        if not line.strip():
            continue
        item, sep, title = line.partition("::")
        if not sep or not item.strip().isdigit():
            raise DelrecError(
                f"expected 'id::title' with an integer id, got {line[:80]!r}", path=f"{names_file}:{lineno}"
            )
        titles[item.strip()] = title.strip()
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    groups: dict[str, str] = {}
    for split in LLARA_SPLITS:
        split_file = _find_one(folder, (f"{split}*.jsonl",), f"LLaRA {split}")
        for lineno, record in _records(split_file, split_file.name):
            seq = _llara_ids(record.get("seq"), split_file, lineno, "seq", many=True)
            (target,) = _llara_ids(record.get("next"), split_file, lineno, "next", many=False)
            length = record.get("len_seq", len(seq))
            if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= len(seq):
                raise DelrecError(
                    f"expected an integer from 0 to {len(seq)} (the length of seq), got {length!r}",
                    path=f"{split_file}:{lineno}",
                    field="len_seq",
                )
            user = f"{split}-{lineno}"
            row = [*seq[:length], target]
            groups[user] = split
            users.extend([user] * len(row))
            items.extend(str(i) for i in row)
            times.extend(range(len(row)))
    return RawData(
        users=np.array(users, dtype=str),
        items=np.array(items, dtype=str),
        timestamps=np.array(times, dtype=np.int64),
        titles=titles,
        domain="games",
        source=str(folder),
        groups=groups,
    )


# --------------------------------------------------------------------------------------------------
# Generic tables


def _read_table(
    folder: Path, stem: str, columns: tuple[str, ...], types: Mapping[str, pa.DataType]
) -> tuple[pa.Table, Path]:
    parquet, csv_file = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    if parquet.is_file():
        try:
            table = pq.read_table(parquet)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DelrecError(f"not a readable Parquet file ({exc})", path=parquet) from exc
        path = parquet
    elif csv_file.is_file():
        table = _read_csv(csv_file, delimiter=",", types=types, explain=_check_against_header(csv_file, ","))
        path = csv_file
    else:
        raise DelrecError(f"missing {stem}.parquet or {stem}.csv", path=folder)
    _require_columns(table, columns, path, f"the generic format's {stem} table")
    if table.num_rows == 0:
        raise DelrecError("the table has no rows", path=path)
    check_values(
        table,
        path,
        ids=tuple(c for c in columns if c in ("user", "item")),
        times=tuple(c for c in columns if c == "timestamp"),
        text_file=path == csv_file,
    )
    return table, path


def _cast_or_none(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray | None:
    try:
        return pc.cast(column, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _text_timestamps(column: pa.ChunkedArray, path: Path, *, text_file: bool) -> pa.ChunkedArray:
    """Timestamps stored as text, read as the first row's kind: numbers or ISO dates. A value of another
    kind is named with its line (Arrow's own message names the first value it could not cast, often a
    good one)."""
    names = {pa.float64(): "a number", pa.timestamp("s"): "an ISO date"}
    first = column.slice(0, 1)
    kind = next((k for k in names if _cast_or_none(first, k) is not None), None)
    cast = _cast_or_none(column, kind) if kind is not None else None
    if cast is not None:
        return cast
    if kind is None:
        first_bad = 0
    else:  # bisect: the first `good` rows cast, the first `bad` rows do not
        good, bad = 1, len(column)
        while bad - good > 1:
            middle = (good + bad) // 2
            castable = _cast_or_none(column.slice(0, middle), kind) is not None
            good, bad = (middle, bad) if castable else (good, middle)
        first_bad = good
    expected = (
        names[kind] if kind is not None else "a number or an ISO date (2024-05-31 or 2024-05-31T12:00:00)"
    )
    like = f", as the first row's {first[0].as_py()!r} is" if kind is not None else ""
    raise DelrecError(
        f"expected {expected}{like}, got {column[first_bad].as_py()!r}",
        path=_where(path, first_bad, text_file, header=True, encoding="utf-8"),
        field="timestamp",
    )


def read_generic(path: Path) -> RawData:
    """``interactions.parquet|csv`` (user, item, timestamp) + ``items.parquet|csv`` (item, title)."""
    if not path.is_dir():
        raise DelrecError("the generic format reads a folder with interactions and items tables", path=path)
    ids = {"user": pa.string(), "item": pa.string()}
    inter, inter_path = _read_table(path, "interactions", ("user", "item", "timestamp"), ids)
    items, _ = _read_table(path, "items", ("item", "title"), {"item": pa.string(), "title": pa.string()})
    stamp = inter.column("timestamp")
    if pa.types.is_string(stamp.type) or pa.types.is_large_string(stamp.type):
        stamp = _text_timestamps(stamp, inter_path, text_file=inter_path.suffix == ".csv")
    if pa.types.is_timestamp(stamp.type) or pa.types.is_date(stamp.type):
        stamp = pc.cast(
            pc.cast(stamp, pa.timestamp("s")) if pa.types.is_date(stamp.type) else stamp, pa.int64()
        )
    if not (pa.types.is_integer(stamp.type) or pa.types.is_floating(stamp.type)):
        raise DelrecError(f"expected numbers or dates, got {stamp.type}", path=inter_path, field="timestamp")
    titles = {
        item: title
        for item, title in zip(_strings(items.column("item")), items.column("title").to_pylist(), strict=True)
        if isinstance(title, str)
    }
    return RawData(
        users=_strings(inter.column("user")),
        items=_strings(inter.column("item")),
        timestamps=_order_values(stamp.to_numpy()),
        titles=titles,
        domain="products",
        source=str(path),
    )


FORMATS: dict[str, Callable[[Path], RawData]] = {
    "movielens": read_movielens,
    "recbole": read_recbole,
    "amazon-json": read_amazon_json,
    "steam": read_steam,
    "sequences": read_sequences,
    "llara": read_llara,
    "generic": read_generic,
}


def _descend(folder: Path) -> Path:
    """Skip folders that only wrap one folder (as zips do: ``ml-100k.zip`` holds ``ml-100k/``)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def read_path(reader: Callable[[Path], RawData], path: Path) -> RawData:
    """Run ``reader`` on a local folder or file; a zip archive is first extracted to a temporary folder."""
    if path.is_dir():
        return reader(_descend(path))
    if path.suffix != ".zip" and not zipfile.is_zipfile(path):
        return reader(path)
    with tempfile.TemporaryDirectory(prefix="delrec-zip-") as tmp:
        unzip(path, Path(tmp))
        try:
            raw = reader(_descend(Path(tmp)))
        except DelrecError as exc:  # name the member inside the archive, not the temporary copy
            raise DelrecError(str(exc).replace(tmp, f"{path}!")) from None
    raw.source = str(path)
    return raw
