"""The markdown-claims check that the notebook tests use: it fails on a wrong, a missing or an unchecked number."""
import json

import nbformat
import pytest

from tests.markdown_claims import Claim, check_claims, check_full_run, full_run_metrics, notebook_size


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


def test_thousands_other_bold_numbers_and_bounds(tmp_path):
    """**1,000** is 1000; "<B>" skips a bold number another Claim checks; an at-most Claim is a one-sided bound."""
    path = write_notebook(tmp_path / "nb.ipynb", "about **1,000** images, **4.6** against **3.6**, within the first **50**")
    claims = [Claim(r"about <N> images", "images", 50), Claim(r"<N> against", "a", 0.5),
              Claim(r"<B> against <N>,", "b", 0.5), Claim(r"within the first <N>", "last", 0, at_most=True)]
    metrics = {"images": 1040, "a": 4.6, "b": 3.4, "last": 20}
    assert len(check_claims(path, metrics, claims, "ci")) == 4
    with pytest.raises(AssertionError, match="quotes 50 for last"):
        check_claims(path, {**metrics, "last": 52}, claims, "ci")
    with pytest.raises(AssertionError, match="quotes 1000 for images"):
        check_claims(path, {**metrics, "images": 1060}, claims, "ci")


def write_run(runs, number, size, metrics):
    """A notebook's output folder as start_notebook and write_metrics leave it: runs/NN/{notebook_run,metrics}.json."""
    folder = runs / number
    folder.mkdir(parents=True)
    (folder / "notebook_run.json").write_text(json.dumps({"size": size, "figure_dir": str(folder / "figures")}))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_full_run_is_read_and_checked_without_executing(tmp_path, monkeypatch):
    path = write_notebook(tmp_path / "09_fake.ipynb", "argmax uses **15** of them; takes **90 %** of the samples; "
                                                      "perplexity **9.9** at full size")
    write_run(tmp_path / "runs", "09", "full", {"used": 15, "share_fraction": 0.9, "perplexity_full": 10.2})
    assert full_run_metrics(path, tmp_path / "runs")["perplexity_full"] == 10.2
    monkeypatch.setenv("CODIS_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    in_percent = lambda metrics: {**metrics, "share": 100 * metrics["share_fraction"]}  # noqa: E731
    metrics = check_full_run(path, CLAIMS, in_percent)  # the full-size Claim is checked: 10.2 is within 0.5 of 9.9
    assert metrics["used"] == 15 and "share" not in metrics  # the run's own metrics come back
    with pytest.raises(AssertionError, match="metric 'share'"):
        check_full_run(path, CLAIMS)  # without the function the Claims name a key the run does not have
    write_run(tmp_path / "other", "09", "full", {"used": 15, "share_fraction": 0.9, "perplexity_full": 11.0})
    monkeypatch.setenv("CODIS_NOTEBOOK_RUNS", str(tmp_path / "other"))
    with pytest.raises(AssertionError, match="quotes 9.9 for perplexity_full"):
        check_full_run(path, CLAIMS, in_percent)


def test_a_ci_run_or_a_missing_file_is_refused_naming_the_file(tmp_path):
    path = write_notebook(tmp_path / "09_fake.ipynb", "argmax uses **15** of them")
    folder = write_run(tmp_path / "runs", "09", "ci", {"used": 15})
    with pytest.raises(AssertionError, match=f"{folder / 'notebook_run.json'}: a size='ci' run"):
        full_run_metrics(path, tmp_path / "runs")
    (folder / "notebook_run.json").write_text(json.dumps({"size": "full"}))
    (folder / "metrics.json").unlink()
    with pytest.raises(AssertionError, match=f"{folder / 'metrics.json'}: missing"):
        full_run_metrics(path, tmp_path / "runs")
    with pytest.raises(AssertionError, match=f"{tmp_path / 'nowhere' / '09' / 'notebook_run.json'}: missing"):
        full_run_metrics(path, tmp_path / "nowhere")


def test_the_full_run_check_is_skipped_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("CODIS_NOTEBOOK_RUNS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="CODIS_NOTEBOOK_RUNS"):
        check_full_run(write_notebook(tmp_path / "09_fake.ipynb", "nothing bold"), CLAIMS)
