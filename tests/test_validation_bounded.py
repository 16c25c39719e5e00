"""Issue 15 item 6: validation renders a fixed, bounded, seeded subset (also of .txt corpora)."""
from __future__ import annotations

from amortized3d.corpora import read_corpus_file
from amortized3d.data import PromptDataModule, validation_subset


def test_the_subset_is_bounded_seeded_in_corpus_order_and_the_same_for_every_run():
    prompts = [f"prompt number {i}" for i in range(1000)]
    sub = validation_subset(prompts, 16)
    assert len(sub) == 16 and sub == sorted(sub, key=prompts.index)
    assert sub == validation_subset(list(prompts), 16)  # not the run's seed: every method validates these
    assert sub != prompts[:16] and len({prompts.index(p) // 100 for p in sub}) > 3  # spread over the corpus
    assert validation_subset(prompts[:10], 16) == prompts[:10] and validation_subset(prompts, None) == prompts


def test_a_txt_corpus_no_longer_validates_on_the_whole_corpus(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("\n".join(f"a shape number {i}" for i in range(2520)) + "\n")
    corpus = read_corpus_file(path)
    assert len(corpus.unique("val")) == 2520  # a plain prompt list: every split is the whole list
    dm = PromptDataModule(corpus.unique("train"), corpus.unique("val"), batch_size=2, max_val_prompts=16)
    assert len(dm.val_prompts) == 16 and set(dm.val_prompts) <= set(corpus.unique("val"))
