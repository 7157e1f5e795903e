"""Where a data key's records come from: one reader for every kind of data (conversations,
prompts, rankings, labelled texts), whatever the file format.

`read_records(spec, parse)` -> ([(where, parse(record))], skipped), for `spec`:
    a.jsonl (or any other name)  one JSON object per line, read by data/jsonl.py's jsonl_lines and
                                 loads_line (UTF-8, nesting cap, lone surrogates, torn lines), with
                                 their messages; where = "file:LINE"
    a.json                       a top-level JSON list of objects; where = "file:item N" (from 1)
    a.parquet                    one record per row (pyarrow); where = "file:row N" (from 1)
    a.csv                        a header row, then one record per row (every value text; a
                                 UTF-8 BOM is dropped); where = "file:LINE", the line of the file
                                 the row starts on (the header is line 1), as an editor shows it
    a folder                     every .jsonl/.json/.parquet/.csv file directly in it, sorted by
                                 name, all of one kind (other files are left alone), each read as
                                 above (each must hold a usable record); or a folder written by
                                 `datasets`' save_to_disk (its "train" split, or its only one),
                                 where = "folder:row N"
    hf:org/name[:config][@split] a Hub dataset through datasets.load_dataset (split "train" by
                                 default); offline (HF_HUB_OFFLINE=1), datasets' own cache, then a
                                 snapshot in huggingface_hub's cache; where = "hf:org/name@split:row N"
`columns` maps our field names to the source's ({"prompt": "question"}): applied to each record
before `parse`. A mapped column that a Parquet, CSV or datasets source lacks is a DataError
naming the source and the column before anything is parsed; a JSON record that lacks it is a bad
line (the first record is checked up front, so a wrong map fails at once).
A record `parse` refuses (ValueError) is a DataError naming where it is, or with
skip_bad_lines is skipped and counted. A source with no usable record is an error.
JSON and CSV need nothing more; Parquet and Hub datasets need the `hub` extra (pyarrow, datasets),
imported only when such a source is read.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from llmtrain.data.jsonl import _surrogate_at, jsonl_lines, loads_line
from llmtrain.errors import ConfigError, DataError
from llmtrain.files import regular_file

KINDS = (".jsonl", ".json", ".parquet", ".csv")
HUB_EXTRA = "pip install 'llmtrain[hub]'"
CSV_FIELD_LIMIT = 1 << 28  # the csv module refuses fields over 128 KB by default: a long document is one


def read_records(spec, parse, *, skip_bad_lines: bool = False, columns: dict | None = None
                 ) -> tuple[list[tuple[str, object]], int]:
    columns = _check_map(columns)
    if str(spec).startswith("hf:"):
        label, ds = _load_hub(str(spec))
        return _parse_rows(label, _dataset_rows(label, ds, columns), parse, skip_bad_lines, columns)
    p = Path(spec)
    if not p.is_dir():
        return _read_file(p, parse, skip_bad_lines, columns)
    if (p / "dataset_dict.json").is_file() or ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()):
        label, ds = _load_saved(p)
        return _parse_rows(label, _dataset_rows(label, ds, columns), parse, skip_bad_lines, columns)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in KINDS and f.is_file())
    if not files:
        raise DataError(f"{p}: is a directory with no {', '.join(KINDS)} files in it (nor a dataset saved "
                        f"by datasets' save_to_disk)")
    kinds = sorted({f.suffix.lower() for f in files})
    if len(kinds) > 1:
        raise DataError(f"{p}: holds both {kinds[0]} and {kinds[1]} files; a folder is read as files of one kind")
    items, skipped = [], 0
    for f in files:
        got, n = _read_file(f, parse, skip_bad_lines, columns)
        items += got
        skipped += n
    return items, skipped


def _check_map(columns) -> dict | None:
    if not columns:
        return None
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                for k, v in columns.items()):
        raise ConfigError(f"the column map must map our field names to the data's column names "
                          f"(e.g. {{prompt: question}}), got {columns!r}")
    return columns


def _rename(rec, columns: dict | None):
    """Our field names on a record: each mapped column moves to our name (others stay)."""
    if not columns or not isinstance(rec, dict):
        return rec
    for ours, theirs in columns.items():
        if theirs not in rec:
            raise ValueError(f"no column '{theirs}' (the column map reads '{ours}' from it)")
    out = {k: v for k, v in rec.items() if k not in columns.values()}
    out.update({ours: rec[theirs] for ours, theirs in columns.items()})
    return out


def _missing(label: str, names, columns: dict | None) -> None:
    """A DataError naming the source and the first mapped column it lacks."""
    for ours, theirs in (columns or {}).items():
        if theirs not in names:
            raise DataError(f"{label}: no column '{theirs}' (the column map reads '{ours}' from it); "
                            f"its columns: {', '.join(map(str, names)) or 'none'}")


def _parse_rows(label: str, rows, parse, skip_bad_lines: bool, columns, check_text: bool = False, noun: str = "rows"):
    """[(where, parse(record))] and how many were skipped, for the (where, record) of one source."""
    items, skipped = [], 0
    for where, rec in rows:
        try:
            if isinstance(rec, BadRow):
                raise ValueError(rec.msg)
            bad = _surrogate_at(rec) if check_text else None
            if bad is not None:
                raise ValueError(f"{bad} holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), not text")
            items.append((where, parse(_rename(rec, columns))))
        except ValueError as e:
            if not skip_bad_lines:
                raise DataError(f"{where}: {e}") from None
            skipped += 1
    if not items:
        raise DataError(f"{label}: no usable {noun}")
    return items, skipped


# ----------------------------------------------------------------------------- files

def _read_file(p: Path, parse, skip_bad_lines: bool, columns):
    p = regular_file(p, "a data file", "data file", DataError)  # folders were taken care of above
    kind = p.suffix.lower()
    if kind == ".json":
        rows, escapes = _json_rows(p, columns)
        return _parse_rows(str(p), rows, parse, skip_bad_lines, columns, check_text=escapes)
    if kind == ".parquet":
        return _parse_rows(str(p), _parquet_rows(p, columns), parse, skip_bad_lines, columns)
    if kind == ".csv":
        return _parse_rows(str(p), _csv_rows(p, columns), parse, skip_bad_lines, columns)
    return _parse_rows(str(p), _jsonl_rows(p, columns), parse, skip_bad_lines, columns, noun="lines")


def _jsonl_rows(p: Path, columns):
    """One record per non-blank line, decoded by data/jsonl.py's loads_line (nesting cap, lone
    surrogates); a line that is no JSON is a BadRow saying why. The first record is checked
    against the column map, so a wrong map fails at once rather than as every line skipped."""
    first = True
    for n, line in jsonl_lines(p):
        try:
            rec = loads_line(line)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            yield f"{p}:{n}", BadRow(f"malformed JSON ({e.msg} at column {e.colno})"
                                     if isinstance(e, json.JSONDecodeError) else str(e))
            continue
        if first and isinstance(rec, dict):
            _missing(f"{p}:{n}", rec, columns)
        first = False
        yield f"{p}:{n}", rec


def _json_rows(p: Path, columns):
    """-> (rows of a JSON file holding a list of objects, whether to look for lone surrogates)."""
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(f"{p}: a .json data file holds a list of records (one object per line is a .jsonl file)")
    if data and isinstance(data[0], dict):
        _missing(f"{p}:item 1", data[0], columns)
    return ((f"{p}:item {i}", rec) for i, rec in enumerate(data, 1)), "\\u" in text


def _parquet_rows(p: Path, columns):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow: {HUB_EXTRA}") from None
    try:
        f = pq.ParquetFile(p)
        _missing(str(p), f.schema_arrow.names, columns)
        n = 0
        for batch in f.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield f"{p}:row {n}", rec
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, a bad UTF-8 string too
        raise DataError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _csv_rows(p: Path, columns):
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    line = 0
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return
            _missing(str(p), header, columns)
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    yield f"{p}:{line}", BadRow(f"has {len(row)} cells, the header has {len(header)}")
                else:
                    yield f"{p}:{line}", dict(zip(header, row))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{p}:{line}: not valid CSV ({e})") from None


class BadRow:
    """A row that is no record (a CSV row with more or fewer cells than its header): a bad line."""

    def __init__(self, msg: str):
        self.msg = msg


# ----------------------------------------------------------------------------- datasets

def _datasets(label: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading a Hugging Face dataset needs the datasets package: {HUB_EXTRA}") from None
    return datasets


def _load_hub(spec: str):
    """hf:org/name[:config][@split] -> (label, datasets.Dataset)."""
    name_cfg, _, split = spec[3:].partition("@")
    name, _, config = name_cfg.partition(":")
    if not name or name.count("/") > 1 or not split and spec.endswith("@"):
        raise DataError(f"{spec}: a Hub dataset is written hf:org/name[:config][@split]")
    split = split or "train"
    label = f"hf:{name}{':' + config if config else ''}@{split}"
    datasets = _datasets(label)
    try:
        try:
            return label, datasets.load_dataset(name, config or None, split=split)
        except ConnectionError as e:  # offline or unreachable: a copy in huggingface_hub's cache
            from huggingface_hub import snapshot_download
            try:
                folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
            except Exception:
                raise DataError(f"{label}: {_line(e)}, and no copy of it in the Hugging Face cache") from None
            return label, datasets.load_dataset(folder, config or None, split=split)
    except DataError:
        raise
    except Exception as e:  # not found, gated, unknown split or config, broken files: datasets' own words
        raise DataError(f"{label}: cannot load ({type(e).__name__}: {_line(e)})") from None


def _load_saved(p: Path):
    """A folder written by Dataset(Dict).save_to_disk -> (label, Dataset)."""
    datasets = _datasets(str(p))
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # a torn or foreign folder
        raise DataError(f"{p}: cannot load the saved dataset ({type(e).__name__}: {_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if "train" not in names and len(names) != 1:
            raise DataError(f"{p}: a saved dataset with the splits {', '.join(names)} and no 'train': "
                            f"give the folder of one split ({p}/<split>)")
        ds = ds["train" if "train" in names else names[0]]
    return str(p), ds


def _dataset_rows(label: str, ds, columns):
    _missing(label, ds.column_names, columns)
    for i, rec in enumerate(ds, 1):
        yield f"{label}:row {i}", rec


def _line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
