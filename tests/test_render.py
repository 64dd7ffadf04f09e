"""Tables of render.py from report figures (no model needed)."""

from hemorrhage_hf.measurement.report import HemorrhageReport
from hemorrhage_hf.render import console_table, markdown_table, variant_markdown, variant_table


def _report(kl_mean: float, severity: str) -> HemorrhageReport:
    figures = {"ppl_reference": 10.0, "ppl_modified": 12.0, "ppl_ratio": 1.2, "kl_mean": kl_mean}
    figures |= {"kl_mean_error": 0.002, "top1_agreement": 0.8, "n_tokens": 1000, "severity": severity}
    return HemorrhageReport(figures=figures, metadata={"modified": "m + int4-g64", "corpus": "python-docs"})


def test_a_variant_sits_beside_the_modified_model_in_console_and_markdown():
    report = _report(0.3, "moderate")
    report.variants["corrected"] = _report(0.2, "moderate")
    lines = variant_table(report, "corrected", plain="uncorrected").splitlines()
    assert lines[0].split() == ["uncorrected", "corrected"]
    kl_row = next(line for line in lines if line.startswith("KL mean"))
    assert "0.30000 ± 0.00200" in kl_row and kl_row.rstrip().endswith("0.20000 ± 0.00200")
    markdown = variant_markdown(report, "corrected", title="Side by side", plain="uncorrected")
    assert "| figure | uncorrected | corrected |" in markdown and "- **Modified:** m + int4-g64" in markdown


def test_the_console_table_says_what_the_grade_means_and_flags_a_boundary():
    text = console_table(_report(0.097, "mild"))
    assert "mild: fit to ship for most uses" in text
    assert "near the mild/moderate boundary (0.1)" in text
    assert "near" not in console_table(_report(0.05, "mild"))


def test_markdown_cells_cannot_break_the_table():
    assert markdown_table(["a"], [["x | y"]]).splitlines()[-1] == "| x \\| y |"
