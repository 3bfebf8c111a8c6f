"""`nnx reproduce cs231n`, in its seconds-long quick version, and the claims' criteria."""
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.app import app
from experiments.reproduce import Settings, monotone_claim, reproduce_cs231n, variance_claim

FIGURES = ("capacity.png", "regularization.png", "variance.png")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cs231n")
    return reproduce_cs231n(out, workers=1, quick=True)


def test_quick_reproduce_writes_three_figures_and_a_report(quick_report):
    out = quick_report.path.parent
    for name in FIGURES:
        assert (out / name).stat().st_size > 0
    text = quick_report.path.read_text()
    for name in FIGURES:
        assert f"]({name})" in text
    assert [c.name for c in quick_report.claims] == ["1. Capacity", "2. Regularization",
                                                     "3. Seed variance"]


def test_report_states_each_claims_criterion_and_verdict(quick_report):
    text = quick_report.path.read_text()
    for claim in quick_report.claims:
        verdict = "**held**" if claim.held else "**did not hold**"
        assert f"| {claim.name} | {claim.criterion} | {verdict} |" in text


def test_rerunning_resumes_the_finished_sweeps(quick_report):
    out = quick_report.path.parent
    lines = []
    reproduce_cs231n(out, workers=1, quick=True, log=lines.append)
    assert all("already done" in line and "(0 already" not in line for line in lines)


def stats(means):
    return pd.DataFrame({"mean_complexity": means}, index=["3", "6", "20"])


def test_capacity_claim_needs_a_strict_increase():
    assert monotone_claim("c", stats([0.01, 0.02, 0.03]), "hidden", increasing=True).held
    assert not monotone_claim("c", stats([0.01, 0.01, 0.03]), "hidden", increasing=True).held


def test_regularization_claim_needs_a_strict_decrease():
    assert monotone_claim("r", stats([0.03, 0.02, 0.01]), "reg", increasing=False).held
    assert not monotone_claim("r", stats([0.03, 0.04, 0.01]), "reg", increasing=False).held


def test_variance_claim_compares_smallest_and_largest_net_for_every_reg():
    s = Settings()
    s.variance_hidden = (3, 100)
    summary = pd.DataFrame({"hidden": ["3", "100", "3", "100"], "reg": ["0.001", "0.001", "0.01", "0.01"],
                            "std_final_train_loss": ["0.05", "0.01", "0.05", "0.03"]})
    claim = variance_claim(summary, s)
    assert not claim.held                                 # reg 0.01: 0.05 < 2 * 0.03
    assert "ratio 5.0" in claim.evidence
    summary.loc[3, "std_final_train_loss"] = "0.02"
    assert variance_claim(summary, s).held


def test_reproduce_command_refuses_an_unknown_target():
    result = CliRunner().invoke(app, ["reproduce", "mnist"])
    assert result.exit_code == 2
