"""The scale benchmark runs at small sizes and reports identical old/new results (timings are not tested)."""
from amortized3d.benchmark_scale import bench_scale, bench_text_table, synthetic_corpus


def test_scale_benchmark_rows_report_identical_results():
    rows = bench_scale([15, 300], rounds=1, turntable_views=8)
    assert [r["benchmark"] for r in rows] == (["R@1 per prompt"] * 3 + ["data stream per step"] * 2
                                             + ["per-prompt iNGP training memory (estimate)"] * 3)
    assert all(r["identical"] is True for r in rows if "identical" in r)
    assert all(r["speedup"] > 0 for r in rows if "speedup" in r)


def test_the_text_table_row_measures_a_private_copy_old_and_a_shared_map_new(tmp_path):
    startup, memory = bench_text_table([20_000], dim=64, ranks=2, rounds=1, cache_root=tmp_path)
    table_mib = 20_000 * 64 * 4 / 2**20  # the old fp32 copy
    assert memory["old_private_MiB"] >= 0.9 * table_mib and memory["new_private_MiB"] < 0.25 * table_mib
    assert startup["old_s"] > 0 and startup["new_s"] > 0


def test_the_synthetic_corpus_is_a_reference_format_corpus(tmp_path):
    from amortized3d.corpora import read_corpus_file

    corpus = read_corpus_file(synthetic_corpus(500, tmp_path / "s.json", num_val=20, num_test=30))
    assert corpus.counts() == {"train": 500, "val": 20, "test": 30} and len(set(corpus.split("train"))) == 500


def test_the_ingp_step_row_times_dense_and_sparse_updates():
    from amortized3d.benchmark_scale import bench_ingp_step

    rows = bench_ingp_step((3, 40), points=64, rounds=1)
    assert rows[1]["parameters"] * 3 == rows[0]["parameters"] * 40  # the same grid per prompt at both sizes
    assert all(r["dense_s_per_step"] > 0 and r["sparse_s_per_step"] > 0 and r["sparse_cpu_s_per_step"] > 0
               for r in rows)
