"""Tables of render.py from report figures (no model needed)."""

from hemorrhage_hf.measurement.report import HemorrhageReport
from hemorrhage_hf.render import allocation_markdown, console_table, markdown_table, variant_markdown, variant_table


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


def test_the_allocation_is_compared_with_each_uniform_spec_it_was_judged_beside():
    def row(spec, bits, kl, vs):
        return {
            "spec": spec,
            "bits_per_weight": bits,
            "kl_mean": kl,
            "kl_mean_error": 0.02,
            "top1_agreement": 0.7,
            "ppl_ratio": 1.3,
            "n_tokens": 1022,
            "vs": {other: {"mean_difference": d, "standard_error": 0.01} for other, d in vs.items()},
        }

    mix = "int4-g64+int6-g64@layers.29.v_proj"
    judged = [
        row("int4-g64", 4.25, 0.48, {mix: 0.23, "int4-g32": 0.08}),
        row(mix, 4.5, 0.25, {"int4-g64": -0.23, "int4-g32": -0.155}),
        row("int4-g32", 4.5, 0.40, {"int4-g64": -0.08, mix: 0.155}),
    ]
    for entry in judged[1:]:
        entry["vs_first"], entry["kl_cut"] = entry["vs"]["int4-g64"], 1 - entry["kl_mean"] / 0.48
    result = {
        "map": "out/map",
        "allocation": {
            "spec": mix,
            "budget_bits": 4.5,
            "bits_per_weight": 4.5,
            "base_bits_per_weight": 4.25,
            "base_kl": 0.45,
            "estimated_kl": 0.2,
        },
        "held_out": {"corpus": "wiki.txt", "skip_tokens": 512},
        "judged": judged,
    }
    text = allocation_markdown(result)
    assert (
        "The allocation against `int4-g32` (4.5000 bits per weight): Δ KL -0.1550 ± 0.0100 (paired), 37.5% less KL."
        in text
    )
    assert "The allocation against `int4-g64`" not in text  # the base is the table's own paired column
