"""llm_bench cell formats (SPEC §7)."""

from h2okit.table import cell, extra_columns, mean_sd, render, speed_cell


def test_cells_are_mean_and_sample_stdev():
    assert mean_sd([1.0]) == (1.0, 0.0)
    assert cell([1.0, 2.0, 3.0], "%.3f") == "2.000 ± 1.000"
    assert cell([0.33333], "%.4f") == "0.3333 ± 0.0000"
    assert speed_cell([500.0, 502.0], [15.0, 15.0]) == "501.00 ± 1.41<br>15.00 ± 0.00"


def test_negative_zero_is_printed_as_zero():
    assert cell([-1e-9], "%.2f") == "0.00 ± 0.00" and cell([-0.5], "%.2f") == "-0.50 ± 0.00"


def test_extra_columns_follow_a_fixed_order_and_render():
    assert [k for k, _ in extra_columns(["ppl", "kv_true_ratio", "passkey_d50"])] == ["kv_true_ratio", "ppl",
                                                                                     "passkey_d50"]
    assert render(["a", "b"], [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |\n"


def test_runnable_tasks_reads_the_least_of_its_samples(tmp_path):
    from h2okit.bench import runnable_tasks

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.52 0.58 0.59 3/412 12345\n")
    assert runnable_tasks(samples=2, gap_s=0, loadavg=loadavg) == 3
    loadavg.write_text("garbage\n")
    assert runnable_tasks(samples=1, gap_s=0, loadavg=loadavg) is None
    assert runnable_tasks(samples=1, gap_s=0, loadavg=tmp_path / "missing") is None
