"""What the README cites exists: every repository path and module it names, the files its Layout table
names in each folder (and every top-level module, in that table), the options of every ``scx`` command it
shows, and the nox sessions it names. A renamed file, module or option fails here, not in a reader's shell.
(The README's Python blocks are run by tests/test_readme.py.)"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
from pathlib import Path

import pytest

from scx_ref.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: The repository's top-level folders: a cited path that starts with one of them is a repository path.
ROOTS = ("scx_ref", "tests", "models", "proofs", "properties", "mutation")
#: Import names of those folders (pyproject.toml installs ``models`` as ``scx_models``).
PACKAGES = {"scx_ref": "scx_ref", "scx_models": "models", "models": "models", "proofs": "proofs"}
#: Repository paths the README names that a run creates (none are cited today): each must still be cited
#: and absent, so the list cannot hide a renamed file.
CREATED_AT_RUN_TIME: frozenset[str] = frozenset()

_FENCE = re.compile(r"```[a-z]*\n(.*?)```", flags=re.S)
_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(ROOTS) + r")/[\w./{},*-]*(?:::\w+)?)")
_MODULE = re.compile(r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_]\w*)+)")


def code_spans(text: str) -> list[str]:
    """The fenced blocks' contents and the inline code spans of markdown ``text``."""
    inline = re.findall(r"`([^`\n]+)`", _FENCE.sub("", text))
    return _FENCE.findall(text) + inline


def cited_paths(text: str) -> set[str]:
    """Repository paths in ``text``'s code and link targets, as written (braces, ``*``, ``::test``)."""
    found = {m.group(1).rstrip(".,;:") for span in code_spans(text) for m in _PATH.finditer(span)}
    links = {target for target in re.findall(r"\]\(([^)#\s]+)\)", text) if not target.startswith("http")}
    return found | links


def _expand(path: str) -> list[str]:
    """``a_{x,y}.json`` → ``a_x.json``, ``a_y.json`` (shell brace expansion, nested left to right)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    alternatives = (path[: m.start()] + alt + path[m.end() :] for alt in m.group(1).split(","))
    return [expanded for alternative in alternatives for expanded in _expand(alternative)]


def path_exists(cited: str) -> bool:
    """Whether ``cited`` names something in the checkout: every brace alternative exists, a glob
    matches at least one file, and a ``file.py::test_x`` node's function is defined in that file."""
    for path in _expand(cited):
        file, _, node = path.partition("::")
        if "*" in file:
            found = any(ROOT.glob(file))
        else:
            found = (ROOT / file).exists()
            source = (ROOT / file).read_text("utf-8") if found and node else ""
            found = found and (not node or re.search(rf"^(?:async )?def {node}\(", source, re.M) is not None)
        if not found:
            return False
    return True


def relative_paths(text: str) -> set[str]:
    """Inline code spans that are a path inside one of the top-level folders (``protocol/server.py``,
    ``results/PERFORMANCE.md``)."""
    spans = re.findall(r"`([^`\n]+)`", _FENCE.sub("", text))
    pattern = r"[\w-]+(?:/[\w.{},*-]+)+\.(?:py|md|json|txt|toml)"
    return {s for s in spans if re.fullmatch(pattern, s) and not s.startswith(ROOTS)}


def missing_paths(text: str) -> list[str]:
    """The repository paths ``text`` cites that are not in the checkout (nor made at run time); a path
    inside a top-level folder (``protocol/server.py``) exists in one of them."""
    missing = [p for p in cited_paths(text) if p not in CREATED_AT_RUN_TIME and not path_exists(p)]
    missing += [p for p in relative_paths(text) if not any(path_exists(f"{r}/{p}") for r in ROOTS)]
    return sorted(missing)


def module_exists(dotted: str) -> bool:
    """Whether ``dotted`` is a module or package of the repository, or a name its source defines or
    imports (``scx_ref.protocol.preset``): resolved by files and text, nothing imported."""
    top, *parts = dotted.split(".")
    here = ROOT / PACKAGES[top]
    for i, part in enumerate(parts):
        if (here / part / "__init__.py").exists():
            here = here / part
        elif (here / f"{part}.py").exists():
            here = here / f"{part}.py"
        else:
            source = here / "__init__.py" if here.is_dir() else here
            return source.exists() and re.search(rf"\b{part}\b", source.read_text("utf-8")) is not None
        if here.is_file() and i + 1 < len(parts):  # a name inside the module
            return re.search(rf"\b{parts[i + 1]}\b", here.read_text("utf-8")) is not None
    return True


def missing_modules(text: str) -> list[str]:
    """The repository modules (``python -m X``, ``scx_ref.x.y``) ``text``'s code names that do not exist."""
    names = {m.group(1) for span in code_spans(text) for m in _MODULE.finditer(span)}
    return sorted(n for n in names if not module_exists(n))


def test_every_cited_repository_path_exists() -> None:
    cited = cited_paths(README)
    assert len(cited) > 50  # the parser reads the README's paths (95 when written)
    assert missing_paths(README) == []
    for path in CREATED_AT_RUN_TIME:
        assert path in cited and not path_exists(path), path


def test_every_cited_module_exists() -> None:
    assert missing_modules(README) == []


@pytest.mark.parametrize(
    "edit",
    [
        "`scx_ref/no_such_module.py`",  # a fake path
        "[table](models/results/NO_SUCH.md)",  # a link
        "`models/results/bench_hf_s29_{1t,3t}.json`",  # one brace alternative missing
        "`models/results/no_such_*.json`",  # a glob matching nothing
        "`tests/test_batching.py::test_no_such_test`",  # a test node that is not in its file
        "`protocol/no_such_stage.py`",  # a path inside a top-level folder
    ],
)
def test_control_a_missing_path_is_reported(edit: str) -> None:
    """Negative control: the same check on the README plus one path that does not exist fails."""
    missing = missing_paths(README + "\n" + edit + "\n")
    assert len(missing) == 1 and missing[0] in edit


def test_control_a_renamed_test_file_is_reported() -> None:
    """A file renamed under the README (as 54 of tests/ were at once) is reported by its old name."""
    assert "`tests/test_batching.py`" in README
    renamed = README.replace("tests/test_batching.py", "tests/test_batching_s52.py")
    assert missing_paths(renamed) == ["tests/test_batching_s52.py"]


@pytest.mark.parametrize(
    "name", ["models.no_such_script", "scx_ref.protocol.no_such_name", "scx_models.nope"]
)
def test_control_a_missing_module_is_reported(name: str) -> None:
    assert missing_modules(README + f"\n`python -m {name}`\n") == [name]


# ---- the Layout table


def layout_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """The Layout table's rows: (the paths in its first column, the code spans of its second)."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) == 2:
            paths = [p for p in re.findall(r"`([^`]+)`", cells[0]) if "/" in p]
            rows.append((paths, re.findall(r"`([^`]+)`", cells[1])))
    return rows


def layout_problems(text: str) -> list[str]:
    """What the Layout table gets wrong: a file it names in a folder's row (``keyring.py``) that is not in
    that folder, and a top-level module or package of ``scx_ref``, a script of ``models/`` or a folder of
    the repository that no row names."""
    rows = layout_rows(text)
    problems = []
    for paths, spans in rows:
        folders = [ROOT / p for p in paths if p.endswith("/")]
        for name in spans:
            a_file = re.fullmatch(r"[\w/]+\.(?:py|md|toml|txt)", name) and not name.startswith(ROOTS)
            if a_file and not any((folder / name).exists() for folder in folders):
                problems.append(f"{name} (row {', '.join(paths)})")
    listed = {p.rstrip("/") for paths, _ in rows for p in paths}
    modules = {f"scx_ref/{p.name}" for p in (ROOT / "scx_ref").glob("*.py") if p.name != "__init__.py"}
    packages = {f"scx_ref/{p.parent.name}" for p in (ROOT / "scx_ref").glob("*/__init__.py")}
    unlisted = (modules | packages | set(ROOTS)) - listed - {"scx_ref"}
    problems += sorted(f"{m} not in the table" for m in unlisted)
    models_row = next((spans for paths, spans in rows if "models/" in paths), [])
    scripts = {p.name for p in (ROOT / "models").glob("*.py") if p.name != "__init__.py"}
    problems += sorted(f"models/{s} not in the table" for s in scripts - set(models_row))
    return problems


def test_layout_names_what_exists_and_everything_that_does() -> None:
    assert len(layout_rows(README)) >= 20
    assert layout_problems(README) == []


def test_control_layout_reports_a_missing_file_and_an_unlisted_module() -> None:
    assert "`keyring.py`" in README and "| `scx_ref/stages.py` |" in README
    stale = README.replace("`keyring.py`", "`keyring_s40.py`").replace("| `scx_ref/stages.py` |", "| |")
    assert layout_problems(stale) == [
        "keyring_s40.py (row scx_ref/protocol/)",
        "scx_ref/stages.py not in the table",
    ]


# ---- commands: scx options, nox sessions


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def scx_commands(text: str) -> list[list[str]]:
    """Every ``scx <command> …`` the README shows (code lines and inline spans), split as a shell would;
    a line's comment, continuation backslashes and any ``|`` or ``&&`` after the command dropped."""
    commands = []
    for span in code_spans(text):
        for line in span.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an inline span that quotes only part of a command line
                continue
            for start in (i for i, w in enumerate(words) if w == "scx"):
                rest = list(itertools.takewhile(lambda w: w not in {"|", "&&", ";"}, words[start + 1 :]))
                if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):  # not ``scx = …`` or ``scx <cmd>:``
                    commands.append(rest)
    return commands


def unknown_options(text: str) -> list[str]:
    """``scx <command> --option`` pairs the README shows that the command's parser does not have."""
    parsers = _subparsers()
    unknown = []
    for command, *words in scx_commands(text):
        if command not in parsers:
            unknown.append(f"scx {command}")
            continue
        options = set(parsers[command]._option_string_actions)
        options_shown = [w for w in words if w.startswith("--")]
        unknown += [f"scx {command} {w}" for w in options_shown if w.split("=")[0] not in options]
    return sorted(set(unknown))


def test_every_scx_option_shown_exists() -> None:
    commands = scx_commands(README)
    assert len(commands) >= 15
    assert {c[0] for c in commands} >= {"verify", "serve", "generate", "bench", "bench-serve", "dp", "attack"}
    assert unknown_options(README) == []


def test_control_an_unknown_scx_option_is_reported() -> None:
    edited = README + "\n```bash\nscx serve --model tiny-llama --max-clients 4   # no such option\n```\n"
    edited += "`scx nope --x`\n"
    assert unknown_options(edited) == ["scx nope", "scx serve --max-clients"]


def test_every_nox_session_named_exists() -> None:
    sessions = set(re.findall(r"@nox\.session\ndef (\w+)\(", (ROOT / "noxfile.py").read_text("utf-8")))
    named = set(re.findall(r"nox -s (\w+)", README))
    assert named and named <= sessions
    defaults = re.search(r"`nox` runs the default sessions: (.*?)\.\n", README, flags=re.S)
    assert defaults is not None
    listed = re.findall(r"`(\w+)`\s\(", defaults.group(1)) + re.findall(r"and `(\w+)`$", defaults.group(1))
    noxfile = (ROOT / "noxfile.py").read_text("utf-8")
    noxfile_defaults = re.search(r"nox\.options\.sessions = \[(.*?)\]", noxfile)
    assert noxfile_defaults is not None
    assert sorted(listed) == sorted(re.findall(r'"(\w+)"', noxfile_defaults.group(1)))
