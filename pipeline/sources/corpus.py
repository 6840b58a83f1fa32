"""Where text comes from: packaged corpus, local files, hub datasets; several mixed by weight."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pipeline.errors import PipelineError
from pipeline.sources.assets import PACKAGED_CORPORA, packaged_corpus_file

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _texts_from_records(records: Iterable, field: str, where: str) -> Iterator[str]:
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            yield rec
            continue
        if not isinstance(rec, dict) or field not in rec:
            raise PipelineError(f"{where}: record {i} has no text field {field!r}")
        yield rec[field]


def _read_utf8(path: Path) -> str:
    """A local corpus file's text. Corpus files are UTF-8: anything else is a one-line error naming the file,
    the offset and line of the first byte that does not decode, and the expected encoding (the whole file is
    decoded at once, so the offset counts from its start)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PipelineError(
            f"{path}: not UTF-8 text at byte {e.start} (line {line}: 0x{raw[e.start]:02x}, {e.reason}); corpus "
            f"files are read as UTF-8: convert it first (e.g. iconv -f LATIN1 -t UTF-8)"
        ) from None


def _read_local(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")  # the newlines text mode gives
        return [d.strip() for d in text.split("\n\n")]
    if suffix == ".jsonl":
        records = []
        # the lines as text-mode iteration gives them (\r\n and \r end a line too); not str.splitlines, which
        # would also cut at U+2028 and U+0085, characters a JSON string may hold unescaped
        lines = _read_utf8(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PipelineError(f"{path}: line {n} is not valid JSON") from None
        return list(_texts_from_records(records, field, str(path)))
    if suffix == ".json":
        try:
            data = json.loads(_read_utf8(path))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            data = list(data.values())
        if not isinstance(data, list):
            raise PipelineError(f"{path}: expected a list of records (or a mapping of them)")
        return list(_texts_from_records(data, field, str(path)))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise PipelineError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
        return [t for t in table.column(field).to_pylist() if t is not None]
    raise PipelineError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")


def _packaged_texts(name: str) -> list[str]:
    if name == "wiki-vital":
        data = json.loads(packaged_corpus_file(name).read_text(encoding="utf-8"))
        # {title: {title, extract, description, topic}}; the extract is the article lead
        return [rec["extract"] for _, rec in sorted(data.items()) if rec.get("extract")]
    raise AssertionError(name)


def _hub_texts(path: str, name: str | None, split: str, streaming: bool, field: str, seed: int) -> Iterator[str]:
    import datasets

    try:
        if Path(path).is_dir():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"cannot load dataset {path!r}: {first}") from None
    cols = ds.column_names or []
    if cols and field not in cols:
        raise PipelineError(f"dataset {path!r} has no column {field!r} (columns: {', '.join(cols)})")
    ds = ds.shuffle(seed=seed, buffer_size=10_000) if streaming else ds.shuffle(seed=seed)
    for rec in ds:
        yield rec[field]


def source_kind(path: str) -> str:
    """'packaged' | 'local' | 'hub'."""
    if path in PACKAGED_CORPORA:
        return "packaged"
    p = Path(path)
    if p.suffix.lower() in LOCAL_SUFFIXES:
        if not p.is_file():
            raise PipelineError(f"corpus file not found: {path}")
        return "local"
    if p.is_dir():
        return "hub"  # a datasets.save_to_disk folder
    if path.count("/") <= 1 and not path.startswith((".", "/")):
        return "hub"
    raise PipelineError(
        f"corpus {path!r} not found: not a packaged name ({', '.join(PACKAGED_CORPORA)}), "
        f"a {'/'.join(LOCAL_SUFFIXES)} file or a hub dataset id"
    )


def iter_documents(source, default_field: str, seed: int) -> Iterator[str]:
    """Non-empty documents of one source (a `SourceConfig`), in a seeded shuffled order."""
    field = source.text_field or default_field
    kind = source_kind(source.path)
    if kind == "hub":
        docs: Iterable[str] = _hub_texts(source.path, source.name, source.split, source.streaming, field, seed)
    else:
        texts = _packaged_texts(source.path) if kind == "packaged" else _read_local(Path(source.path), field)
        random.Random(seed).shuffle(texts)
        docs = texts
    for t in docs:
        if isinstance(t, str) and t.strip():
            yield t


def mix_documents(sources: Sequence, default_field: str, seed: int) -> Iterator[str]:
    """Interleave sources: each next document comes from a source drawn with probability ~ weight.

    An exhausted source drops out and the rest continue, so the mix ends when all are exhausted.
    """
    iters = [iter_documents(s, default_field, seed + 7919 * i) for i, s in enumerate(sources)]
    weights = [float(s.weight) for s in sources]
    rng = random.Random(seed)
    live = list(range(len(iters)))
    while live:
        (i,) = rng.choices(live, weights=[weights[j] for j in live])
        try:
            yield next(iters[i])
        except StopIteration:
            live.remove(i)
