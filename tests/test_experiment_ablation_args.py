"""experiments/ablation.py's arguments: the per-step costs that set the equal-time budget."""
import pytest

from tests.helpers import load_script
from tests.nbharness import REPO_ROOT

ablation = load_script(REPO_ROOT / "experiments" / "ablation.py")


def test_step_seconds_give_each_mode_its_cost():
    args = ablation.parse_args(["--equal-time", "--step-seconds", "clip=0.15", "albef=0.6", "codis=0.5"])
    assert args.step_seconds == {"clip": 0.15, "albef": 0.6, "codis": 0.5}
    assert ablation.parse_args([]).step_seconds is None  # default: the equal-steps runs' mean training time


@pytest.mark.parametrize("given, said", [
    (["clip=0.15", "albef=0.6"], "give every mode"),          # codis missing
    (["clip=fast", "albef=0.6", "codis=0.5"], "expected MODE=SECONDS"),
    (["clip=0.15", "albef=0", "codis=0.5"], "seconds positive"),
    (["clip=0.15", "albef=0.6", "codis=0.5", "bert=1"], "one of --modes"),
])
def test_bad_step_seconds_are_refused_naming_the_argument(given, said, capsys):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--step-seconds", *given])
    error = capsys.readouterr().err
    assert "--step-seconds" in error and said in error
