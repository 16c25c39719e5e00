"""The scale benchmark runs at small sizes and reports identical old/new results (timings are not tested)."""
from amortized3d.benchmark_scale import bench_scale


def test_scale_benchmark_rows_report_identical_results():
    rows = bench_scale([15, 300], rounds=1, turntable_views=8)
    assert [r["benchmark"] for r in rows] == ["R@1 per prompt"] * 3 + ["data stream per step"] * 2
    assert all(r["identical"] is True for r in rows)
    assert all(r["speedup"] > 0 for r in rows)
