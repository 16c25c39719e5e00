"""Named prompt corpora: manifest, lookup, download/verify, splits and validation.

Third-party corpora (MG15, DF415, AT2520, DL17k, CP100k) are never shipped with the
project. ``data/prompt_corpora/manifest.json`` records where each one comes from and its
sha256, so a copy read from a user path or downloaded on first use is provably the file
the published numbers were measured on. Corpus files are validated with messages that
name the file, line and split, because a bad prompt found at step 40k is expensive.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence, Union

from amortized3d.atomic import atomic_path

PathLike = Union[str, "os.PathLike[str]"]
ENV_VAR = "AMORTIZED3D_CORPORA_DIR"
REPO_CORPORA_DIR = Path(__file__).resolve().parents[1] / "data" / "prompt_corpora"
MANIFEST_PATH = REPO_CORPORA_DIR / "manifest.json"
DOWNLOAD_CLI = "python scripts/download_corpora.py"


class CorpusError(ValueError):
    """A corpus is unknown, malformed or fails verification."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """A named corpus' file is in none of the searched directories."""


class CorpusChecksumError(CorpusError):
    """A corpus file's sha256 differs from the manifest."""


class CorpusDownloadError(CorpusError, OSError):
    """Downloading a corpus failed (typically: no network)."""


@dataclass(frozen=True)
class CorpusSpec:
    """One manifest entry. ``sha256`` is None where the file is not pinned (own or unavailable)."""

    name: str
    file: str
    url: str | None = None
    sha256: str | None = None
    counts: Mapping[str, int | None] = field(default_factory=dict, hash=False)
    counts_exact: bool = False  # informational: False where counts are approximate (CP100k)
    description: str = ""
    shipped: bool = False
    notes: str = ""


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: ordered prompt tuples per split (duplicates kept, as in the source)."""

    name: str
    splits: Mapping[str, tuple[str, ...]] = field(hash=False)
    source: Path
    sha256: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))

    def split(self, name: str) -> tuple[str, ...]:
        """Prompts of one split, in file order."""
        try:
            return self.splits[name]
        except KeyError:
            raise KeyError(f"corpus {self.name!r} has no split {name!r}; valid splits: "
                           f"{', '.join(self.splits)}") from None

    def unique(self, split: str = "train") -> tuple[str, ...]:
        """Prompts of one split without duplicates, first occurrence order (DL17k repeats some)."""
        return tuple(dict.fromkeys(self.split(split)))

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def with_train_prompt(self, index: int, split: str = "train") -> "Corpus":
        """This corpus with ``split`` reduced to its ``index``-th unique prompt (one prompt per run,
        as ProlificDreamer trains); the other splits are kept, e.g. as retrieval candidates."""
        prompts = self.unique(split)
        if not 0 <= int(index) < len(prompts):
            raise IndexError(f"prompt index {index} is out of range: split {split!r} of corpus {self.name!r} "
                             f"has {len(prompts)} unique prompts (valid: 0..{len(prompts) - 1})")
        return Corpus(self.name, {**self.splits, split: (prompts[int(index)],)}, self.source, self.sha256)


# ---------------------------------------------------------------- manifest
@functools.lru_cache(maxsize=4)
def load_manifest(path: PathLike = MANIFEST_PATH) -> Mapping[str, CorpusSpec]:
    """Parse the manifest into specs keyed by corpus name."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return MappingProxyType({name: CorpusSpec(name=name, **entry) for name, entry in raw["corpora"].items()})


def list_corpora() -> tuple[str, ...]:
    return tuple(load_manifest())


def get_spec(name: str) -> CorpusSpec:
    manifest = load_manifest()
    if name not in manifest:
        raise CorpusError(f"unknown corpus {name!r}; valid names: {', '.join(manifest)} "
                          "(or give a path to a .json/.txt corpus file)")
    return manifest[name]


# ---------------------------------------------------------------- parsing and validation
_WS = re.compile(r"[ \t\n\r]*")


def prompt_problem(prompt: Any, allow_padding: bool = False) -> str | None:
    """What is wrong with one prompt (None: nothing); the same rule for corpus files, export, evaluate.

    ``allow_padding``: only for the published corpora pinned by the manifest's sha256 (DF415 has three
    whitespace-padded prompts; its prompts are kept verbatim, as the published numbers used them)."""
    if not isinstance(prompt, str):
        return f"is not a string ({prompt!r:.40}); every prompt must be a non-empty string"
    if not prompt.strip():
        return "is an empty prompt; every prompt must be a non-empty string"
    if prompt != prompt.strip() and not allow_padding:
        return (f"has leading/trailing whitespace ({prompt!r:.60}); it would change the text embedding "
                "invisibly")
    return None


def check_prompt(prompt: Any, where: str = "prompt") -> str:
    """``prompt`` if it is a valid prompt, else CorpusError naming ``where`` (a key, file:line...)."""
    problem = prompt_problem(prompt)
    if problem:
        raise CorpusError(f"{where} {problem}")
    return prompt


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CorpusError(f"key {key!r} appears more than once (JSON would silently keep the last)")
        out[key] = value
    return out


def _top_level_offsets(text: str) -> dict[str, tuple[int, list[int]]]:
    """Offsets of each top-level key and of every element of its list, for line numbers.

    ``json`` forgets positions once parsed, so this re-walks the (already validated) text
    with ``raw_decode``, which reports where each value ends.
    """
    dec, out = json.JSONDecoder(), {}
    i = _WS.match(text, 0).end() + 1  # past "{"
    while (i := _WS.match(text, i).end()) < len(text) and text[i] != "}":
        key_at = i
        key, i = json.decoder.scanstring(text, i + 1)
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # past ":"
        items: list[int] = []
        if text[i] != "[":
            _, i = dec.raw_decode(text, i)
        else:
            i = _WS.match(text, i + 1).end()
            while text[i] != "]":
                items.append(i)
                _, i = dec.raw_decode(text, i)
                i = _WS.match(text, i).end()
                if text[i] == ",":
                    i = _WS.match(text, i + 1).end()
            i += 1
        out[key] = (key_at, items)
        i = _WS.match(text, i).end()
        if i < len(text) and text[i] == ",":
            i += 1
    return out


def _parse_json(text: str, source: Path, pinned: bool = False) -> dict[str, tuple[str, ...]]:
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{source}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except CorpusError as e:
        raise CorpusError(f"{source}: {e}") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{source}: a JSON corpus must be an object with keys 'train', 'val', "
                          f"'test' (lists of prompt strings), not a {type(data).__name__}")
    if "train" not in data:
        raise CorpusError(f"{source}: missing the 'train' split (found keys: {', '.join(data) or 'none'})")

    def line(key: str, index: int | None = None) -> int:
        key_at, items = _top_level_offsets(text)[key]  # positions are recovered only to report an error
        return _line_of(text, key_at if index is None else items[index])

    for key, value in data.items():
        if not isinstance(value, list):
            raise CorpusError(f"{source}:{line(key)}: split {key!r} must be a list of prompt strings, "
                              f"not {type(value).__name__}")
        if key == "train" and not value:
            raise CorpusError(f"{source}:{line(key)}: split 'train' is empty")
        for index, prompt in enumerate(value):
            problem = prompt_problem(prompt, allow_padding=pinned)
            if problem:
                raise CorpusError(f"{source}:{line(key, index)}: split {key!r} item {index} {problem}")
    return {key: tuple(value) for key, value in data.items()}


def _parse_text(text: str, source: Path, pinned: bool = False) -> dict[str, tuple[str, ...]]:
    """One prompt per line; all three splits are the whole list (a plain prompt list is not split)."""
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    while lines and not lines[-1].strip():  # trailing newlines at EOF are harmless
        lines.pop()
    if not lines:
        raise CorpusError(f"{source}: empty corpus (expected one prompt per line)")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise CorpusError(f"{source}:{n}: blank line; a .txt corpus holds exactly one prompt per line")
        problem = prompt_problem(line, allow_padding=pinned)
        if problem:
            raise CorpusError(f"{source}:{n}: prompt {problem}")
    prompts = tuple(lines)
    return {"train": prompts, "val": prompts, "test": prompts}


def read_corpus_file(path: PathLike, name: str | None = None) -> Corpus:
    """Read and validate a corpus file (.txt: one prompt per line; anything else: JSON)."""
    source = Path(path).expanduser()
    data = source.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{source}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    parse = _parse_text if source.suffix.lower() == ".txt" else _parse_json
    sha256 = hashlib.sha256(data).hexdigest()
    pinned = any(spec.sha256 == sha256 for spec in load_manifest().values())  # a published file, verbatim
    return Corpus(name=name or source.stem, splits=parse(text, source, pinned), source=source, sha256=sha256)


# ---------------------------------------------------------------- lookup
def _env_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def default_download_dir() -> Path:
    """Where downloads land: the first ``AMORTIZED3D_CORPORA_DIR`` entry, else the repo's data dir."""
    env = _env_dirs()
    return env[0] if env else REPO_CORPORA_DIR


def _missing_message(spec: CorpusSpec, searched: Sequence[Path]) -> str:
    where = "\n".join(f"  - {d}" for d in searched)
    if spec.url:
        fetch = (f"  1. download it (needs network): {DOWNLOAD_CLI} {spec.name}\n"
                 f"     (fetches {spec.url} and checks its sha256), "
                 "or call load_corpus(..., download=True);\n")
    else:
        fetch = f"  1. obtain it yourself: {spec.notes}\n"
    origin = ("It ships with the repository, so this checkout or install is incomplete." if spec.shipped
              else "It is third-party data and is not shipped with amortized3d.")
    return (f"corpus {spec.name!r} ({spec.description}) needs the file {spec.file!r}, found in none of:\n"
            f"{where}\n{origin} To fix, either\n{fetch}"
            f"  2. use an existing copy: pass data.corpus_path=/path/to/{spec.file} "
            f"or set {ENV_VAR}=/directory/containing/it.")


def resolve_corpus_path(name: str, *, path: PathLike | None = None,
                        search_dirs: Sequence[PathLike] = ()) -> Path:
    """Find a named corpus' file: explicit path, then search_dirs, then $AMORTIZED3D_CORPORA_DIR,
    then the repo's data/prompt_corpora/ (where downloads land)."""
    spec = get_spec(name)
    dirs = [Path(d).expanduser() for d in search_dirs] + _env_dirs() + [REPO_CORPORA_DIR]
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        if not explicit.is_dir():
            raise CorpusNotFoundError(f"corpus path {explicit} (given for corpus {name!r}) does not exist")
        dirs.insert(0, explicit)
    for d in dirs:
        if (d / spec.file).is_file():
            return d / spec.file
    raise CorpusNotFoundError(_missing_message(spec, dirs))


def verify_corpus(corpus: Corpus, spec: CorpusSpec) -> None:
    """Check a loaded corpus against its manifest sha256 (no-op for unpinned corpora)."""
    if spec.sha256 and corpus.sha256 != spec.sha256:
        raise CorpusChecksumError(
            f"{corpus.source}: sha256 {corpus.sha256} does not match the manifest's {spec.sha256} for "
            f"corpus {spec.name!r}; the file is truncated, edited or another version. Re-download it "
            f"({DOWNLOAD_CLI} {spec.name} --force) or, to use this file anyway, "
            "pass verify=False to load_corpus.")


def load_corpus(name_or_path: PathLike, *, path: PathLike | None = None,
                search_dirs: Sequence[PathLike] = (), verify: bool = True,
                download: bool = False) -> Corpus:
    """Load a named corpus (see ``list_corpora()``) or a corpus file given by path.

    ``path`` is an explicit file or directory for a named corpus (Hydra: ``data.corpus_path``);
    with an unknown name it loads that file under the given name. ``download=True`` fetches
    a missing named corpus into ``default_download_dir()``.
    """
    key = os.fspath(name_or_path)
    manifest = load_manifest()
    if key not in manifest:
        candidate = Path(path if path is not None else key).expanduser()
        if candidate.is_file():
            return read_corpus_file(candidate, name=key if path is not None else None)
        if path is not None or candidate.suffix or os.sep in key:
            raise CorpusNotFoundError(f"corpus file {candidate} does not exist")
        get_spec(key)  # raises the "unknown corpus, valid names: ..." error
    spec = manifest[key]
    try:
        file = resolve_corpus_path(key, path=path, search_dirs=search_dirs)
    except CorpusNotFoundError:
        if not download or path is not None:
            raise
        file = download_corpus(key, default_download_dir())
    corpus = read_corpus_file(file, name=key)
    if verify:
        verify_corpus(corpus, spec)
    return corpus


# ---------------------------------------------------------------- download
def download_corpus(name: str, dest_dir: PathLike | None = None, *, url: str | None = None,
                    force: bool = False, timeout: float = 60.0) -> Path:
    """Download a named corpus into ``dest_dir`` (sha256-checked, atomic rename); return its path.

    ``url`` overrides the manifest's source (a mirror). An existing verified file is kept
    unless ``force``. A partial or corrupt download never replaces the target.
    """
    spec = get_spec(name)
    url = url or spec.url
    if not url:
        raise CorpusDownloadError(f"corpus {name!r} has no download address. {spec.notes}")
    dest = Path(dest_dir).expanduser() if dest_dir is not None else default_download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / spec.file
    if target.is_file() and not force:
        if spec.sha256 is None or hashlib.sha256(target.read_bytes()).hexdigest() == spec.sha256:
            return target
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:  # a wrong checksum raises inside: the target is never replaced
        with open(tmp, "xb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        digest.update(chunk)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                raise CorpusDownloadError(
                    f"could not download corpus {name!r} from {url}: {getattr(e, 'reason', e)}. Offline, "
                    f"copy {spec.file} from a machine that has it into {dest} (or a directory in {ENV_VAR}), "
                    f"or pass data.corpus_path=/path/to/{spec.file}.") from e
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise CorpusChecksumError(f"download of corpus {name!r} from {url} has sha256 "
                                      f"{digest.hexdigest()}, expected {spec.sha256}; nothing was written.")
    return target
