"""Text sources for trace collection: hub datasets, local files and the bundled corpus, read alike.

Hub datasets are read through `datasets` in streaming mode; local files (and the bundled corpus)
through the same interface, so every source is shuffled with the seed, filtered and counted
alike, and a bundled domain is sampled exactly like a hub dataset. `sample_balanced` takes the same number
of texts from each source and interleaves them, so every shard holds every source.

Source specs (`--datasets`, comma separated):
    imdb, yelp_review_full, ag_news, squad, amazon_polarity, dbpedia_14   hub datasets (the seed's six)
    seed                                   all six hub datasets
    movie_reviews, news, ...               a bundled corpus domain (routing_data/corpus)
    bundled                                every bundled trace domain (the default)
    jsonl:PATH[:FIELD] parquet:PATH[:FIELD] csv:PATH[:FIELD] text:PATH    local files (FIELD default "text")
"""
from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "routing_data" / "corpus"
MIN_CHARS = 50          # the original collector dropped texts shorter than this
SHUFFLE_BUFFER = 10_000  # hub datasets' streaming shuffle buffer; local files are permuted exactly (LocalRows)


def _join(*fields: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: "\n".join(str(row[f]) for f in fields if row.get(f))


# The seed's six datasets: hub id -> how to make one text of a row (the right fields, not just "text")
HUB_DATASETS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "imdb": ("stanfordnlp/imdb", _join("text")),
    "yelp_review_full": ("Yelp/yelp_review_full", _join("text")),
    "ag_news": ("fancyzhx/ag_news", _join("text")),
    "squad": ("rajpurkar/squad", _join("question", "context")),
    "amazon_polarity": ("fancyzhx/amazon_polarity", _join("title", "content")),
    "dbpedia_14": ("fancyzhx/dbpedia_14", _join("title", "content")),
}
SEED_DATASETS = list(HUB_DATASETS)


@dataclass
class Source:
    name: str       # short name, recorded in the manifest and used in per-source tables
    kind: str       # hub | bundled | local
    spec: str       # what the user wrote
    loader: Callable[[], Any]  # -> a datasets IterableDataset
    to_text: Callable[[dict[str, Any]], str]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "spec": self.spec}


# ----------------------------------------------------------------------------------------------
# hub access: fail in seconds, not after 25 s of retries


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None if the Hugging Face hub answers a TCP connect, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    # the socket timeout does not bound the DNS lookup, which can hang for tens of seconds where DNS
    # is blocked (two offline runs took 46 s on the GPU machine): resolve on a daemon thread, stop waiting
    found: list[Any] = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4])
        except OSError as e:
            found.append(e)

    lookup = threading.Thread(target=resolve, daemon=True)
    lookup.start()
    lookup.join(timeout)
    if not found:
        return f"cannot resolve {host} within {timeout:.0f} s"
    if isinstance(found[0], OSError):
        return f"cannot resolve {host} ({found[0].strerror or type(found[0]).__name__})"
    try:
        socket.create_connection(found[0][:2], timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e.strerror or type(e).__name__})"
    return None


def require_hub(what: str, alternative: str) -> None:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise UserError(f"{what} needs the Hugging Face hub, which is unreachable: {reason}. {alternative}")


LOCAL_DATA_HINT = ("Use local data instead: --datasets bundled (the shipped corpus), a bundled domain "
                   "(see routing_data/corpus/corpus.json), or jsonl:PATH[:FIELD], parquet:PATH[:FIELD], text:PATH")


# ----------------------------------------------------------------------------------------------
# parsing specs


def bundled_domains(corpus_dir: Path = CORPUS_DIR) -> dict[str, Path]:
    """Trace-split files of the bundled corpus, by domain name."""
    index = corpus_dir / "corpus.json"
    if not index.is_file():
        return {}
    try:
        domains = json.loads(index.read_text())["domains"]
        return {name: corpus_dir / d["splits"]["traces"]["file"] for name, d in domains.items()
                if "traces" in d.get("splits", {})}
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{index}: unreadable corpus index ({e})") from None


def read_local_rows(files: list[str], kind: str, field: str, spec: str) -> Iterator[dict[str, Any]]:
    """Rows of local files. JSON Lines and text need only the standard library (gzip allowed), so
    the bundled corpus reads on machines without pyarrow; parquet and csv go through `datasets`."""
    import gzip

    if kind in ("parquet", "csv"):
        import datasets

        yield from datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
        return
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if kind == "text":
                    if line.strip():
                        yield {field: line.rstrip("\n")}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"--datasets {spec}: {path} line {n} is not JSON") from None
                if not isinstance(row, dict):
                    raise UserError(f"--datasets {spec}: {path} line {n} is not a JSON object")
                yield row


class LocalRows:
    """A local file source with the same interface as a streaming hub dataset: `.shuffle(seed)`
    gives a seeded permutation (local files fit in memory, so the shuffle is exact)."""

    def __init__(self, files: list[str], kind: str, field: str, spec: str):
        self.files, self.kind, self.field, self.spec = files, kind, field, spec
        self.seed: int | None = None

    def shuffle(self, seed: int, buffer_size: int = 0) -> "LocalRows":
        """A full seeded permutation; `buffer_size` is accepted for the streaming interface and not needed."""
        self.seed = seed
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = list(read_local_rows(self.files, self.kind, self.field, self.spec))
        if self.seed is not None:
            import numpy as np

            rows = [rows[i] for i in np.random.default_rng(self.seed).permutation(len(rows))]
        return iter(rows)


def _local_source(kind: str, rest: str, spec: str) -> Source:
    path, _, field = rest.partition(":") if kind != "text" else (rest, "", "")
    if kind != "text" and not Path(path).exists() and Path(rest).exists():
        path, field = rest, ""  # a path that itself contains ':'
    field = field or "text"
    p = Path(path)
    if not p.exists():
        raise UserError(f"--datasets {spec}: no such file or directory: {path}")
    files = sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [str(p)]
    if not files:
        raise UserError(f"--datasets {spec}: directory {path} holds no files")
    kind = "jsonl" if kind == "json" else kind

    def to_text(row: dict[str, Any]) -> str | None:
        if field not in row:
            raise UserError(f"--datasets {spec}: rows have no field {field!r} (fields: {sorted(row)})")
        value = row[field]
        if value is None:  # JSON null, an empty CSV cell: no text (skipped and counted, never the text "None")
            return None
        if not isinstance(value, str):
            raise UserError(f"--datasets {spec}: field {field!r} holds a {type(value).__name__} ({str(value)[:40]!r}), "
                            "not text")
        return value

    return Source(name=p.name.split(".")[0], kind="local", spec=spec,
                  loader=lambda: LocalRows(files, kind, field, spec), to_text=to_text)


def parse_sources(specs: str, corpus_dir: Path = CORPUS_DIR) -> list[Source]:
    """Turn `--datasets a,b,c` into sources; unknown names are an error listing what is known."""
    bundled = bundled_domains(corpus_dir)
    names: list[str] = []
    for part in [s.strip() for s in specs.split(",") if s.strip()]:
        if part == "seed":
            names += SEED_DATASETS
        elif part in ("bundled", "default"):
            if not bundled:
                raise UserError(f"--datasets {part}: no bundled corpus at {corpus_dir} (run tools/build_corpus.py)")
            names += sorted(bundled)
        else:
            names.append(part)
    if not names:
        raise UserError("--datasets is empty")
    sources: list[Source] = []
    hub_checked = False
    for spec in names:
        kind, sep, rest = spec.partition(":")
        if sep and kind in ("jsonl", "json", "parquet", "csv", "text"):
            sources.append(_local_source(kind, rest, spec))
        elif spec in bundled:
            path = bundled[spec]
            if not path.is_file():
                raise UserError(f"bundled domain {spec}: missing file {path}")
            sources.append(Source(name=spec, kind="bundled", spec=spec, to_text=_join("text"),
                                  loader=lambda p=str(path), s=spec: LocalRows([p], "jsonl", "text", s)))
        elif spec in HUB_DATASETS or spec in {v[0] for v in HUB_DATASETS.values()}:
            name = spec if spec in HUB_DATASETS else next(k for k, v in HUB_DATASETS.items() if v[0] == spec)
            if not hub_checked:
                require_hub(f"dataset {spec}", LOCAL_DATA_HINT)
                hub_checked = True
            hub_id, to_text = HUB_DATASETS[name]
            sources.append(Source(name=name, kind="hub", spec=spec, to_text=to_text, loader=lambda h=hub_id: _hub(h)))
        else:
            known = ", ".join(SEED_DATASETS + sorted(bundled))
            raise UserError(f"unknown dataset {spec!r}. Known: {known}, seed, bundled, or jsonl:/parquet:/csv:/text:PATH")
    if len({s.name for s in sources}) != len(sources):
        raise UserError(f"--datasets names a source twice: {[s.name for s in sources]}")
    return sources


def _hub(hub_id: str) -> Any:
    import datasets

    return datasets.load_dataset(hub_id, split="train", streaming=True)


# ----------------------------------------------------------------------------------------------
# sampling


def iter_texts(source: Source, seed: int, min_chars: int = MIN_CHARS,
               skipped: dict[str, int] | None = None) -> Iterator[str]:
    """The source's texts in a seeded shuffled order; those shorter than `min_chars` are skipped and
    counted in `skipped[source.name]`."""
    try:
        ds = source.loader().shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        for row in ds:
            text = source.to_text(row)
            if text is None:  # counted apart from the short ones: a null is a hole in the data, not a short text
                if skipped is not None:
                    skipped[null_key(source.name)] = skipped.get(null_key(source.name), 0) + 1
                continue
            text = text.strip()
            if len(text) >= min_chars:
                yield text
            elif skipped is not None:
                skipped[source.name] = skipped.get(source.name, 0) + 1
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"source {source.spec}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    except (ConnectionError, OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise UserError(f"source {source.spec}: cannot be read ({e}). {LOCAL_DATA_HINT}") from None
    except Exception as e:  # datasets raises many types for unreadable files; all mean the same to a user
        if type(e).__module__.startswith(("datasets", "pyarrow", "json", "pandas", "_csv", "csv")):
            raise UserError(f"source {source.spec}: cannot be read ({type(e).__name__}: {e})") from None
        raise


def null_key(name: str) -> str:
    """The key of `sample_balanced`'s skipped counts for a source's null texts (its short ones: its name)."""
    return f"{name} (null text)"


def sample_balanced(sources: list[Source], per_source: int, seed: int,
                    min_chars: int = MIN_CHARS) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """`per_source` texts from each source, interleaved round-robin: ([(source index, text), ...], the number
    of texts skipped as shorter than `min_chars` per source name, up to where sampling stopped).

    Deterministic for a given seed, so a resumed collection sees exactly the same sequences.
    """
    columns: list[list[str]] = []
    skipped: dict[str, int] = {s.name: 0 for s in sources}
    for source in sources:
        texts = []
        for text in iter_texts(source, seed, min_chars, skipped):
            texts.append(text)
            if len(texts) == per_source:
                break
        if len(texts) < per_source:
            nulls = skipped.get(null_key(source.name), 0)
            raise UserError(f"source {source.name} has only {len(texts)} texts of >= {min_chars} characters "
                            f"({skipped[source.name]} shorter ones{f' and {nulls} null ones' if nulls else ''} "
                            f"skipped), {per_source} needed for a balanced "
                            "sample; lower --target_traces, lower --min-chars or add sources")
        columns.append(texts)
    return [(s, columns[s][i]) for i in range(per_source) for s in range(len(sources))], skipped
