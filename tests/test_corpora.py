"""Named corpora: the real libraries (when ../shared/corpora exists), lookup, errors, validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amortized3d import corpora
from amortized3d.corpora import (
    CorpusChecksumError,
    CorpusDownloadError,
    CorpusError,
    CorpusNotFoundError,
    download_corpus,
    load_corpus,
    read_corpus_file,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
PUBLIC = ("mg15", "df415", "at2520", "dl17k")
EXPECTED = {  # from ../shared/corpora/README.md; the manifest must agree
    "mg15": ({"train": 15, "val": 15, "test": 15},
             "c0cb81ee7130aee58760c5b019f4e8fa0178716b5438ec8fcc3d067110bd22e2"),
    "df415": ({"train": 415, "val": 16, "test": 415},
              "ec1fb26bd30a03620faf559c172c2a465e957fa5e6a34faf1a183e9eaa2940d6"),
    "at2520": ({"train": 2520, "val": 56, "test": 2520},
               "eea8423cb5e244df3a475cd29f7d0400b959f1d1deb5dcd3bc901625f23cdb3b"),
    "dl17k": ({"train": 17241, "val": 100, "test": 100},
              "dc4e3bdc863a568b0a26f0e765b4b3e17be56a0bc8f790dbbdaa5b40a55f2cef"),
}
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference corpora not found at {SHARED}")


@pytest.fixture(autouse=True)
def _no_env_dirs(monkeypatch):
    monkeypatch.delenv(corpora.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def real() -> dict[str, corpora.Corpus]:
    if not SHARED.is_dir():
        pytest.skip(f"reference corpora not found at {SHARED}")
    return {name: load_corpus(name, search_dirs=[SHARED]) for name in PUBLIC}


def test_manifest_matches_reference_table():
    manifest = corpora.load_manifest()
    assert set(manifest) == {"primitives", "primitives_open", *PUBLIC, "cp100k"}
    for name, (counts, sha) in EXPECTED.items():
        spec = manifest[name]
        assert dict(spec.counts) == counts and spec.sha256 == sha and spec.counts_exact
        assert spec.url == f"https://raw.githubusercontent.com/theEricMa/ScaleDreamer/main/load/{spec.file}"
    assert manifest["cp100k"].sha256 is None and not manifest["cp100k"].counts_exact


@needs_shared
@pytest.mark.parametrize("name", PUBLIC)
def test_real_corpus_counts_and_sha256(real, name):
    counts, sha = EXPECTED[name]
    corpus = real[name]
    assert corpus.counts() == counts and corpus.sha256 == sha and corpus.name == name
    assert corpus.source == SHARED / corpora.get_spec(name).file


@needs_shared
def test_dl17k_duplicates_and_split_relations(real):
    dl = real["dl17k"]
    assert len(dl.split("train")) == 17241 and len(dl.unique("train")) == 13551
    assert dl.unique("train")[0] == dl.split("train")[0]  # order preserved
    at = real["at2520"]
    assert not set(at.split("val")) & set(at.split("train"))
    df = real["df415"]
    assert set(df.split("val")) <= set(df.split("train"))


@needs_shared
def test_env_var_and_explicit_path_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.ENV_VAR, os.pathsep.join([str(tmp_path), str(SHARED)]))
    assert load_corpus("mg15").source == SHARED / "magic3d_15_prompt_library.json"
    monkeypatch.delenv(corpora.ENV_VAR)
    file = SHARED / "magic3d_15_prompt_library.json"
    assert load_corpus("mg15", path=file).source == file
    assert load_corpus("mg15", path=SHARED).source == file  # a directory works too
    assert load_corpus(str(file)).counts()["train"] == 15  # a bare path, no name


@needs_shared
def test_checksum_mismatch_names_escape_hatch(tmp_path):
    data = json.loads((SHARED / "magic3d_15_prompt_library.json").read_text())
    data["val"] = data["val"][:3]
    (tmp_path / "magic3d_15_prompt_library.json").write_text(json.dumps(data))
    with pytest.raises(CorpusChecksumError, match="verify=False"):
        load_corpus("mg15", search_dirs=[tmp_path])
    assert len(load_corpus("mg15", search_dirs=[tmp_path], verify=False).split("val")) == 3


def test_unknown_name_lists_valid_names():
    with pytest.raises(CorpusError) as err:
        load_corpus("mg16")
    for name in ("primitives", *PUBLIC, "cp100k"):
        assert name in str(err.value)


def test_missing_file_message_names_url_and_fixes(tmp_path):
    with pytest.raises(CorpusNotFoundError) as err:
        load_corpus("df415", search_dirs=[tmp_path])
    msg = str(err.value)
    assert "dreamfusion_415_prompt_library.json" in msg and corpora.get_spec("df415").url in msg
    assert "scripts/download_corpora.py df415" in msg and "data.corpus_path=" in msg
    assert corpora.ENV_VAR in msg and str(tmp_path) in msg and str(corpora.REPO_CORPORA_DIR) in msg
    with pytest.raises(CorpusNotFoundError, match="does not exist"):
        load_corpus("df415", path=tmp_path / "nope.json")
    with pytest.raises(CorpusNotFoundError, match="Cap3D"):
        load_corpus("cp100k", search_dirs=[tmp_path])


def test_split_error_lists_valid_splits(tmp_path):
    (tmp_path / "c.json").write_text('{"train": ["a", "b", "a"], "test": ["c"]}')
    corpus = load_corpus(tmp_path / "c.json")
    assert corpus.name == "c" and corpus.unique("train") == ("a", "b")
    with pytest.raises(KeyError, match="valid splits: train, test"):
        corpus.split("val")
    with pytest.raises(TypeError):
        corpus.splits["train"] = ()  # read-only


def _error(tmp_path, text: str, suffix: str = ".json") -> str:
    file = tmp_path / f"bad{suffix}"
    file.write_text(text)
    with pytest.raises(CorpusError) as err:
        read_corpus_file(file)
    return str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    msg = _error(tmp_path, '{\n  "train": [\n    "a",\n    "b"\n    "c"\n  ]\n}\n')
    assert "bad.json:5:5" in msg and "invalid JSON" in msg


@pytest.mark.parametrize("value, what", [('""', "empty prompt"), ('"  "', "empty prompt"),
                                         ("42", "not a string"), ("null", "not a string"),
                                         ('["x"]', "not a string")])
def test_bad_prompt_reports_split_index_and_line(tmp_path, value, what):
    text = ('{\n  "train": ["one", "two",\n            "three"],\n  "val": [\n    "ok",\n'
            f'\n    {value},\n    "fine"\n  ]\n}}\n')
    msg = _error(tmp_path, text)
    assert "bad.json:7:" in msg and "split 'val' item 1" in msg and what in msg


def test_bad_prompt_on_shared_line_and_escaped_strings(tmp_path):
    # escapes and brackets inside strings must not confuse the line tracker
    msg = _error(tmp_path, '{"val": ["a\\"]", "b"],\n "train": ["x\\ny", "[", \n\n 7]}')
    assert "bad.json:4:" in msg and "split 'train' item 2" in msg


def test_structure_errors(tmp_path):
    assert "missing the 'train' split" in _error(tmp_path, '{"val": ["a"], "test": ["b"]}')
    assert "must be an object" in _error(tmp_path, '["a", "b"]')
    assert "bad.json:3: split 'val' must be a list" in _error(tmp_path, '{\n"train": ["a"],\n"val": "b"}')
    assert "'train' is empty" in _error(tmp_path, '{"train": []}')
    assert "appears more than once" in _error(tmp_path, '{"train": ["a"], "train": ["b"]}')
    file = tmp_path / "latin1.json"
    file.write_bytes(b'{"train":\n ["caf\xe9"]}')
    with pytest.raises(CorpusError, match="latin1.json:2: not valid UTF-8"):
        read_corpus_file(file)


def test_text_corpus(tmp_path):
    file = tmp_path / "mine.txt"
    file.write_text("a red cube\r\na blue sphere\na red cube\n\n")
    corpus = load_corpus(str(file))
    assert corpus.split("train") == ("a red cube", "a blue sphere", "a red cube")
    assert corpus.split("val") == corpus.split("test") == corpus.split("train")
    assert corpus.unique("train") == ("a red cube", "a blue sphere")
    assert "bad.txt:2: blank line" in _error(tmp_path, "a\n\nb\n", ".txt")
    assert "bad.txt:3: blank line" in _error(tmp_path, "a\nb\n \t\nc", ".txt")
    assert "bad.txt:2: prompt has leading/trailing whitespace" in _error(tmp_path, "a\nb \n", ".txt")
    assert "empty corpus" in _error(tmp_path, "\n\n", ".txt")


def test_custom_name_with_explicit_path(tmp_path):
    (tmp_path / "p.txt").write_text("x\ny\n")
    assert load_corpus("my_prompts", path=tmp_path / "p.txt").name == "my_prompts"


def test_primitives_corpus_loads():
    if not (corpora.REPO_CORPORA_DIR / "primitives.json").is_file():
        pytest.skip("primitives.json not written yet")
    corpus = load_corpus("primitives")
    assert corpus.split("train") and all(p.strip() for p in corpus.split("train"))


@needs_shared
def test_download_verifies_and_renames_atomically(tmp_path):
    src = SHARED / "magic3d_15_prompt_library.json"
    dest = tmp_path / "dl"
    path = download_corpus("mg15", dest, url=src.as_uri())
    assert load_corpus("mg15", search_dirs=[dest]).sha256 == EXPECTED["mg15"][1]
    assert sorted(p.name for p in dest.iterdir()) == [path.name]
    with pytest.raises(CorpusChecksumError, match="nothing was written"):  # a mirror serving the wrong file
        download_corpus("df415", dest, url=src.as_uri())
    assert sorted(p.name for p in dest.iterdir()) == [path.name]


def test_download_offline_error_is_clear(tmp_path):
    with pytest.raises(CorpusDownloadError) as err:
        download_corpus("mg15", tmp_path, url="http://127.0.0.1:9/mg15.json", timeout=5)
    assert "data.corpus_path=" in str(err.value) and not list(tmp_path.iterdir())
    with pytest.raises(CorpusDownloadError, match="no download address"):
        download_corpus("cp100k", tmp_path)


def test_download_flag_fetches_missing_corpus(tmp_path, monkeypatch):
    if not SHARED.is_dir():
        pytest.skip(f"reference corpora not found at {SHARED}")
    monkeypatch.setenv(corpora.ENV_VAR, str(tmp_path))
    calls = []

    def fake_download(name, dest_dir, **kw):
        calls.append((name, dest_dir))
        return download_corpus(name, dest_dir, url=(SHARED / corpora.get_spec(name).file).as_uri())

    monkeypatch.setattr(corpora, "download_corpus", fake_download)
    with pytest.raises(CorpusNotFoundError):
        load_corpus("mg15")
    assert load_corpus("mg15", download=True).source == tmp_path / "magic3d_15_prompt_library.json"
    assert calls == [("mg15", tmp_path)]
