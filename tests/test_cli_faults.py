"""Issue 25, the rest of the minor list: every command's argument errors are one line, a full disk at start
names the file and leaves no lock behind, SIGTERM is answered in every phase of a run, a link out of the image
root is caught, and a resume says when the image files changed."""
from __future__ import annotations

import pytest


def _one_line_exit_2(status: int, capsys) -> str:
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, (status, err)
    return err


# ---------------------------------------------------------------------------------------------- argparse
def _mains():
    from codis_lib.data.check import main as check_main
    from codis_lib.data.emoji_corpus import main as build_main
    from codis_lib.evaluation.cli import eval_main
    from codis_lib.train.cli import finetune_main, pretrain_main

    return {"codis-check-data": (check_main, ["x.json", "--workers", "abc"], "--workers"),
            "codis-build-emoji": (build_main, ["--limit", "x"], "--limit"),
            "codis-eval": (eval_main, ["--k", "abc"], "--k"),
            "codis-pretrain": (pretrain_main, ["--stop-at-step", "x"], "--stop-at-step"),
            "codis-finetune": (finetune_main, ["--bogus"], "--bogus")}


@pytest.mark.parametrize("prog", ["codis-check-data", "codis-build-emoji", "codis-eval", "codis-pretrain",
                                  "codis-finetune"])
def test_a_bad_argument_is_one_line_naming_it_with_exit_2(prog, capsys):
    main, argv, argument = _mains()[prog]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = _one_line_exit_2(stopped.value.code, capsys)
    assert err.startswith(f"{prog}: error: ") and argument in err and "usage:" not in err


def test_a_missing_positional_argument_is_one_line_too(capsys):
    from codis_lib.data.check import main as check_main

    with pytest.raises(SystemExit) as stopped:
        check_main([])
    assert "annotation" in _one_line_exit_2(stopped.value.code, capsys)
