"""The markdown-claims check that the notebook tests use: it fails on a wrong, a missing or an unchecked number."""
import nbformat
import pytest

from tests.markdown_claims import Claim, check_claims, notebook_size


def write_notebook(path, *markdown):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(text) for text in markdown] + [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(notebook, path)
    return path


CLAIMS = [Claim(r"argmax uses <N> of", "used", 1), Claim(r"takes <N> of the samples", "share", 2.0),
          Claim(r"perplexity <N> at full size", "perplexity_full", 0.5, sizes=("full",))]


def test_numbers_within_tolerance_pass_across_line_breaks(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "argmax uses **15** of\nthe codes; its top code",
                          "takes **90 %** of the samples, perplexity **9.9** at full size")
    checked = check_claims(path, {"used": 14, "share": 91.5, "perplexity_full": 30.0}, CLAIMS, "ci")
    assert [line.split(":")[0] for line in checked] == ["used", "share"]  # the full-size number is not checked at ci


@pytest.mark.parametrize("metrics, size, message", [
    ({"used": 17, "share": 90.0, "perplexity_full": 9.9}, "ci", "quotes 15 for used"),
    ({"used": 15, "share": 90.0, "perplexity_full": 12.0}, "full", "quotes 9.9 for perplexity_full"),
    ({"share": 90.0}, "ci", "metric 'used'"),
])
def test_a_number_off_its_metric_or_without_one_fails(tmp_path, metrics, size, message):
    path = write_notebook(tmp_path / "nb.ipynb", "argmax uses **15** of them; takes **90 %** of the samples; "
                                                 "perplexity **9.9** at full size")
    with pytest.raises(AssertionError, match=message):
        check_claims(path, metrics, CLAIMS, size)


def test_a_missing_phrase_and_an_unclaimed_bold_number_fail(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", "argmax uses **15** of them; **3** codes take most samples; "
                                                 "perplexity **9.9** at full size")
    with pytest.raises(AssertionError) as failure:
        check_claims(path, {"used": 15, "share": 90.0}, CLAIMS, "ci")
    assert "'takes <N> of the samples' found 0 times" in str(failure.value)
    assert "'**3**'" in str(failure.value)


def test_the_size_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("CODIS_NOTEBOOK_SIZE", raising=False)
    assert notebook_size() == "ci"
    monkeypatch.setenv("CODIS_NOTEBOOK_SIZE", "full")
    assert notebook_size() == "full"
    monkeypatch.setenv("CODIS_NOTEBOOK_SIZE", "huge")
    with pytest.raises(ValueError, match="CODIS_NOTEBOOK_SIZE='huge'"):
        notebook_size()
