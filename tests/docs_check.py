"""Check what a markdown page says about the repository: links, paths, code names, commands, flags, config keys.

`page_problems(text, page)` returns one line per thing the page names that does not exist. It reads the
repository's source with `ast` (no torch import); only a dotted `codis_lib` name that the source does not
show (a lazily exported one, say) is looked up by importing its module. What it checks:

- relative markdown links and images resolve, including a `#heading` anchor in a markdown target;
- repository paths (`codis_lib/...`, `tests/...`, `docs/...`, `benchmarks/...`, `notebooks/...`,
  `scripts/...`, `.ci/...`; `<name>` and `*` match anything; a run's `notebooks/outputs/...` is not checked), bare
  `name.py` / `name.yaml` / `name.ipynb`;
- dotted names under `codis_lib` (`codis_lib.evaluation.protocol.PROTOCOL`), `Class.member` of a class of
  the package, calls written `name()` or `name(...)`, and CamelCase class names;
- `codis-*` commands (pyproject's scripts) and their `--flags`, `python benchmarks/x.py --flags` (also experiments/, tools/),
  `-m codis_lib.x --flags`, `--config NAME` and `--set key=value` keys against the run config's dataclasses.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
import tomllib
import typing
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_OUTPUTS = ("notebooks/outputs/",)  # paths a page may name before they exist
REPO_DIRS = ("codis_lib", "tests", "docs", "benchmarks", "experiments", "tools", "notebooks", "scripts", ".ci")
SOURCE_DIRS = ("codis_lib", "benchmarks", "experiments", "tools", "scripts", "tests")
# Class names the pages mention that belong to other projects (PyTorch, timm, transformers), not to this one.
EXTERNAL_CLASSES = {"FlopCounterMode", "DistributedDataParallel", "KeyboardInterrupt", "VisionTransformer",
                    "BertAttention", "BertIntermediate", "BertOutput", "BertLayer", "BertModel"}
FILE_SUFFIXES = {"json", "jsonl", "yaml", "py", "md", "pt", "pth", "png", "txt"}
OTHER_TOOLS = {"torchrun", "pytest", "pip", "papermill", "jupyter", "bash", "time", "git", "python", "python3"}


def split_code(text: str) -> tuple[str, list[str]]:
    """Return (the prose with fenced blocks removed, the command lines of the fenced blocks)."""
    prose, lines, inside = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        (lines if inside else prose).append(line)
    commands, pending = [], ""
    for line in lines:
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}".strip()
        if not line.endswith("\\"):
            commands.append(pending) if pending else None
            pending = ""
    return "\n".join(prose), commands


def code_spans(prose: str) -> list[str]:
    """Inline code spans, whitespace (line breaks included) collapsed."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def slugs(text: str) -> set[str]:
    """GitHub's anchors of a page's headings (code blocks left out; repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_code(text)[0].splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def link_problems(prose: str, page: Path) -> list[str]:
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"link {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in slugs(resolved.read_text()):
            problems.append(f"link {target}: no heading with that anchor")
    return problems


@cache
def source_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def defined_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every function/class/assigned name, every class name) defined in the repository's Python files."""
    names, classes = set(), set()
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(source_tree(path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                    if isinstance(node, ast.ClassDef):
                        classes.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
    return frozenset(names), frozenset(classes)


@cache
def source_words() -> frozenset[str]:
    """Every identifier and string constant of the repository's Python files (names, attributes, arguments)."""
    words = set(defined_names()[0])
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(source_tree(path)):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    words.add(node.value)
                elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
                    words.add(node.arg)
                elif isinstance(node, ast.Attribute):
                    words.add(node.attr)
    return frozenset(words)


def _members(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names bound at the top of a module or class body (defs, classes, assignments, imports)."""
    found: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                found[(alias.asname or alias.name).split(".")[0]] = node
    return found


def module_file(dotted: str) -> Path | None:
    base = ROOT / Path(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def dotted_exists(dotted: str) -> bool:
    """Whether `codis_lib.a.b.C.d` names a module, then attributes found in its source (or, failing that, by import)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is not None:
            break
    else:
        return False
    body, rest = source_tree(path).body, parts[cut:]
    for i, name in enumerate(rest):
        node = _members(body).get(name)
        if isinstance(node, ast.ClassDef):
            body = node.body
        elif node is not None and i == len(rest) - 1:
            return True
        elif module_file(".".join(parts[:cut + i + 1])) is not None:
            return dotted_exists(".".join(parts[:cut + i + 1] + rest[i + 1:]))
        else:
            return _exists_by_import(".".join(parts[:cut]), rest)
    return True


def _exists_by_import(module: str, attributes: list[str]) -> bool:
    """The slow path, for names the source binds indirectly (a lazy export): import and look them up."""
    try:
        obj = importlib.import_module(module)
        for name in attributes:
            obj = getattr(obj, name)
    except (ImportError, AttributeError):
        return False
    return True


def class_member_exists(cls: str, member: str) -> bool:
    for folder in SOURCE_DIRS[:3]:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(source_tree(path)):
                if isinstance(node, ast.ClassDef) and node.name == cls and member in _members(node.body):
                    return True
    return False


def path_problem(token: str) -> str | None:
    """A problem with a path-like token, or None (also when the token is no repository path)."""
    token = token.strip(".,;:()[]'\"")
    if "::" in token:  # a pytest node id, tests/test_x.py::test_name: the file must define that test
        file, _, test = token.partition("::")
        if not (ROOT / file).is_file():
            return f"path {file}: no such file"
        names = {node.name for node in ast.walk(source_tree(ROOT / file))
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        return None if test.split("[")[0] in names else f"test {token}: {file} defines no {test}"
    name = token.rstrip("/")
    if (name + "/").startswith(RUN_OUTPUTS):  # written by running a notebook (the folder too), ignored by git
        return None
    first = name.split("/", 1)[0]
    if first in REPO_DIRS and "/" in token or name in {"README.md", "pyproject.toml", "environment.yml"}:
        if re.search(r"[<*]", name):
            return None if list(ROOT.glob(re.sub(r"<[^>]*>", "*", name))) else f"path {token}: nothing matches"
        return None if (ROOT / name).exists() else f"path {token}: no such file"
    if "/" in name or not re.fullmatch(r"[\w.-]+\.(py|yaml|ipynb)", name):
        return None
    if name.endswith(".yaml"):
        return None if (ROOT / "codis_lib/configs" / name).is_file() else f"config {name}: not in codis_lib/configs"
    if name.endswith(".ipynb"):  # the course's notebooks are NN_topic.ipynb; others (papermill's out.ipynb) are outputs
        if not re.match(r"\d\d_", name):
            return None
        return None if (ROOT / "notebooks" / name).is_file() else f"notebook {name}: not in notebooks/"
    found = any(next((ROOT / folder).rglob(name), None) for folder in SOURCE_DIRS)
    return None if found else f"file {name}: no such file in the repository"


def name_problem(span: str) -> str | None:
    """A problem with a code span that names code, or None."""
    call = re.fullmatch(r"([A-Za-z_][\w.]*)\(.*\)", span)
    name = call.group(1) if call else span
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", name):
        return None
    all_names, classes = defined_names()
    head, _, rest = name.partition(".")
    if head == "codis_lib":
        return None if dotted_exists(name) else f"name {name}: not found in codis_lib"
    if rest and head in classes:
        member = rest.split(".")[0]
        return None if class_member_exists(head, member) else f"name {name}: class {head} has no {member}"
    if call and not rest:
        return None if name in all_names else f"name {name}(): defined nowhere in the repository"
    if not rest and re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", name) and name not in EXTERNAL_CLASSES:
        return None if name in classes else f"class {name}: defined nowhere in the repository"
    if not rest and re.fullmatch(r"_?[a-z][a-z0-9]*(_[a-z0-9]+)+|_\w+", name):
        return None if name in source_words() else f"name {name}: appears nowhere in the repository's source"
    return None


@cache
def scripts() -> dict[str, str]:
    """`codis-*` command -> its module, from pyproject.toml."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {command: target.split(":")[0] for command, target in table.items()}


@cache
def flags_of(path: Path) -> frozenset[str]:
    """The `--flag` strings of a script or module, and of the modules it imports from this repository."""
    found = {"--help"}
    files = [path]
    for node in ast.walk(source_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codis_lib"):
            files += [p for p in [module_file(node.module)] if p is not None]
    for file in files:
        for node in ast.walk(source_tree(file)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                found.add(node.value)
    return frozenset(found)


@cache
def all_flags() -> frozenset[str]:
    paths = [module_file(module) for module in scripts().values()] + [p for d in ("benchmarks", "experiments", "tools") for p in sorted((ROOT / d).glob("*.py"))]
    return frozenset().union(*(flags_of(p) for p in paths if p is not None))


def config_key_problem(key: str) -> str | None:
    """Whether `train.eval.splits` is a field path of the run config (RunConfig, read without torch)."""
    import codis_lib

    cls: typing.Any = codis_lib.RunConfig
    for part in key.split("."):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in fields:
            return f"config key {key}: no field {part!r}"
        hint = typing.get_type_hints(cls)[part]
        cls = next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), hint)
    return None


def command_problems(command: str) -> list[str]:
    """Problems of one command line (a code-block line or an inline span): commands, flags, --set, --config."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    tokens = [t.strip("[]()") for t in tokens]
    problems, flags = [], None
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if re.fullmatch(r"(\.venv/bin/)?codis-[a-z-]+", token):
            name = token.rsplit("/", 1)[-1]
            if name not in scripts():
                problems.append(f"command {name}: not in pyproject.toml's scripts")
                flags = frozenset({"*"})  # its flags cannot be checked
            else:
                flags = flags_of(module_file(scripts()[name]))
        elif token == "-m" and following.startswith("codis_lib"):
            path = module_file(following)
            flags = flags_of(path) if path else frozenset()
        elif token.endswith(".py") and (ROOT / token).is_file():
            flags = flags_of(ROOT / token)
        elif token.rsplit("/", 1)[-1] in OTHER_TOOLS:
            flags = frozenset({"*"})
        elif token.startswith("--") and re.fullmatch(r"--[a-z][\w-]*(=.*)?", token):
            flag = token.split("=", 1)[0]
            known = all_flags() if flags is None else flags
            if "*" not in known and flag not in known:
                problems.append(f"flag {flag} in `{command}`: not defined by its command")
            if flag == "--set" and "*" not in known and "=" in following:
                problems += [p for p in [config_key_problem(following.split("=", 1)[0])] if p]
            if flag == "--config" and "*" not in known and following and not following.startswith("-"):
                problems += [p for p in [path_problem(following if following.endswith(".yaml")
                                                      else following + ".yaml")] if p]
    return problems


def page_problems(text: str, page: Path) -> list[str]:
    """Every problem of one page, in order, without repeats."""
    prose, commands = split_code(text)
    problems = link_problems(prose, page)
    for span in code_spans(prose) + commands:
        for token in span.replace("=", " ").split():
            problems += [p for p in [path_problem(token)] if p]
        problems += [p for p in [name_problem(span)] if p]
        for key in re.findall(r"(?<![\w./-])((?:model|data|train)(?:\.\w+)+)(?=\s*[:=]|$)", span):
            if key.rsplit(".", 1)[-1] in FILE_SUFFIXES:  # a file such as train.json, not a key
                continue
            problems += [p for p in [config_key_problem(key)] if p]
        if re.search(r"(^|\s)(codis-|--|python|torchrun)|-m codis_lib", span):
            problems += command_problems(span)
    return list(dict.fromkeys(problems))
