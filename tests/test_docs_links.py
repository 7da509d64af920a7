"""README.md and docs/*.md name only things that exist, and the README stays a front page.

The checker is tests/docs_check.py (source read with `ast`, no torch). The last tests feed it a page with
one broken thing of each kind, so a checker that stopped finding them would fail here too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs_check import ROOT, page_problems

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
COURSE_TABLE_BY_LINE = 60
KNOWN_STALE: dict[str, set[str]] = {}  # page -> problems tolerated while its rewrite is pending (none now)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_path_and_name_a_page_mentions_exists(page: Path):
    name = str(page.relative_to(ROOT))
    problems = set(page_problems(page.read_text(), page))
    assert problems == KNOWN_STALE.get(name, set()), f"{name}:\n" + "\n".join(sorted(problems))


def test_readme_is_a_front_page_with_the_course_table_early():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    rows = [i for i, line in enumerate(lines) if re.match(r"\| \[\d\d_\w+\]\(notebooks/\d\d_\w+\.ipynb\)", line)]
    assert rows, "README.md has no course table (rows linking notebooks/NN_topic.ipynb)"
    assert rows[-1] < COURSE_TABLE_BY_LINE, f"the course table ends on line {rows[-1] + 1}, after line 60"
    listed = {re.search(r"notebooks/(\d\d_\w+)\.ipynb", lines[i]).group(1) for i in rows}
    assert listed == {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", readme))
    assert linked == {str(p.relative_to(ROOT)) for p in PAGES[1:]}


BROKEN_PAGE = """# A page

See [the method](../docs/METHOD.md), BROKEN_LINKS.
The loop is in `codis_lib/train/engine.py`, its twin in `codis_lib/train/engine_two.py`.
`codis_lib.evaluation.protocol.PROTOCOL` exists, `codis_lib.evaluation.protocol.NO_SUCH` does not.
`protocol_markdown()` is defined, `protocol_markdownn()` is not; `ProtocolRow` is a class, `ProtocolRoww` not.
`ModelConfig.with_tokenizer` exists, `ModelConfig.with_tokenizerr` does not; `_no_such_helper` neither.
Configs: `pretrain_emoji.yaml`, `pretrain_emojii.yaml`; keys `train.num_threads: 1`, `train.num_threadss: 1`.

```bash
codis-pretrain --resume --stop-at-step 3 --set model.alpha=0 --set model.alphaa=0
codis-pretrainn --resume
codis-eval --weights teacher --no-such-flag
python experiments/ablation.py --seeds 0 --no-such-seeds 1
codis-pretrain --config pretrain_emoji_minilm
codis-pretrain --config no_such_config
```
"""
EXPECTED = [
    "link ../docs/missing.md: no such file",
    "link ../docs/results.md#no-such-heading: no heading with that anchor",
    "path codis_lib/train/engine_two.py: no such file",
    "name codis_lib.evaluation.protocol.NO_SUCH: not found in codis_lib",
    "name protocol_markdownn(): defined nowhere in the repository",
    "class ProtocolRoww: defined nowhere in the repository",
    "name ModelConfig.with_tokenizerr: class ModelConfig has no with_tokenizerr",
    "name _no_such_helper: appears nowhere in the repository's source",
    "config pretrain_emojii.yaml: not in codis_lib/configs",
    "config key train.num_threadss: no field 'num_threadss'",
    "config key model.alphaa: no field 'alphaa'",
    "command codis-pretrainn: not in pyproject.toml's scripts",
    "flag --no-such-flag in `codis-eval --weights teacher --no-such-flag`: not defined by its command",
    "flag --no-such-seeds in `python experiments/ablation.py --seeds 0 --no-such-seeds 1`: not defined by its command",
    "config no_such_config.yaml: not in codis_lib/configs",
]


def test_the_checker_finds_one_broken_thing_of_each_kind_and_nothing_else():
    # The page is read as if it stood in tests/, beside this file, so its good link resolves in the repository; the
    # two broken links are put in only here, so that no link checker reading this file's text finds them broken.
    broken_links = "[nothing](../docs/" + "missing.md), [no heading](../docs/results.md" + "#no-such-heading)"
    problems = page_problems(BROKEN_PAGE.replace("BROKEN_LINKS", broken_links), ROOT / "tests" / "example.md")
    assert sorted(problems) == sorted(EXPECTED)


GOOD_PAGE = """# A page

See [the method](../docs/METHOD.md) and [the teacher](../docs/results.md#does-the-teacher-help).
`codis_lib/train/engine.py`, `codis_lib.evaluation.protocol.PROTOCOL`, `protocol_markdown()`, `ProtocolRow`,
`ModelConfig.with_tokenizer`, `pretrain_emoji.yaml`, `train.num_threads: 1`, `codis_lib/configs/reference/<config>.json`.

```bash
codis-pretrain --resume --stop-at-step 3 --set model.alpha=0   # a comment may say --anything
torchrun --nproc_per_node 8 -m codis_lib.train.cli pretrain --config pretrain_4m
```
"""


def test_a_page_with_nothing_broken_has_no_problems():
    assert page_problems(GOOD_PAGE, ROOT / "tests" / "example.md") == []
