"""A CLIP BPE tokenizer whose vocabulary is built from the primitives world's words.

Every word a caption can hold ("a", "red", "cube", ",", "front", "view", ...) is one token, so the toy's
text encoder learns one embedding per word; the 256 byte symbols (and their end-of-word forms) stay in
the vocabulary, so any other text still tokenizes (into bytes), as with CLIP's real vocabulary.
Merges are found greedily: while a word splits into several tokens, the merge of its first two pieces
is appended (lowest priority), which never changes how an already whole word is tokenized.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from amortized3d.cameras import VIEW_LABELS
from amortized3d.priors.sd_random import byte_chars
from amortized3d.scenes.primitives import PrimitivesWorld

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def world_words(world: PrimitivesWorld | None = None) -> list[str]:
    """The words of the world's captions: prompts ("a red cube"), view phrases (", front view")."""
    world = world or PrimitivesWorld()
    words = ["a", "an", ",", "view", *VIEW_LABELS, *world.colours, *world.shapes]
    return list(dict.fromkeys(words))


def _write(directory: Path, merges: list[tuple[str, str]]) -> tuple[Path, Path]:
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(tokens))}))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merges_file


def build_world_tokenizer(directory: str | Path, words: Iterable[str] | None = None, max_length: int = 77):
    """A ``CLIPTokenizer`` (files under ``directory``) that keeps each of ``words`` whole."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    words = list(words) if words is not None else world_words()
    merges: list[tuple[str, str]] = []
    for _ in range(sum(len(w) for w in words) + 1):  # each round adds one merge; bounded
        vocab, merges_file = _write(directory, merges)
        tok = CLIPTokenizer(vocab=str(vocab), merges=str(merges_file), model_max_length=max_length)
        split = {w: tok.tokenize(w) for w in words}
        pending = [(w, pieces) for w, pieces in split.items() if len(pieces) > 1]
        if not pending:
            return tok
        pieces = pending[0][1]
        merges.append((pieces[0], pieces[1]))
    raise RuntimeError(f"could not make every world word one token: {pending}")
