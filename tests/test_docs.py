"""The documentation against the code: pure file reading, no run, no import of metadiff (well under a second).

- every repository path that README.md or a page in docs/ names, in backticks or as a Markdown link target, exists;
  Markdown links resolve relative to the file that holds them (and their `#anchor`, if any, names a heading of the
  target page), backticked paths relative to the repository root;
- the config-group table of docs/configuration.md lists exactly the group directories under conf/ and the options
  (YAML files) in each;
- the README's stage table covers every file in conf/experiment/ under the stage that file runs;
- README.md has at most 150 lines and links every page in docs/.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from conftest import CONF_DIR, REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 150

# A backticked token is taken for a repository path when it starts with one of these folders, or ends with one of
# these suffixes and has a "/" in it (`stages/base.py` inside the README's module tree is in a code block, not
# checked: code blocks hold commands and trees, not paths from the root).
PATH_PREFIXES = ("src/", "conf/", "tests/", "docs/", "scripts/", ".ci/")
PATH_SUFFIXES = (".py", ".yaml", ".md", ".png")
# Paths the docs name that a run creates (all git-ignored or written at run time), so they are not in a checkout:
# outputs/ (run dirs, artifacts, generated data, `outputs/report/report.md`) and bench/ (`make bench` and
# `make gpu-check` write bench/*.json and `bench/gpu_check.md`).
RUNTIME_OUTPUTS = ("outputs/", "bench/")
# Tokens that start with a placeholder (`<run dir>/...`, `$VQA/...`), an absolute or a parent path are not
# repository paths.
NOT_REPO = ("<", "$", "/", "../", "~")

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
PLACEHOLDER = re.compile(r"<[^<>]*>")
GROUPS_HEADING = "## Config groups"
GROUP_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(`[^`|]+`(?:, `[^`|]+`)*)\s*\|")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def prose(path: Path) -> str:
    """The page without its fenced code blocks (same line count: the blocks become blank lines)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())


def backticked_tokens(text: str) -> list[str]:
    """Whitespace-separated tokens of every inline code span, per paragraph (a span may wrap a line)."""
    tokens = []
    for paragraph in re.split(r"\n\s*\n", text):
        for span in INLINE_CODE.findall(paragraph):
            span = PLACEHOLDER.sub("<>", span)  # `<sweep dir>/x.yaml` stays one token, which starts with "<"
            tokens += [t.strip("()[],;:'\"") for t in span.split()]
    return tokens


def looks_like_repo_path(token: str) -> bool:
    if "://" in token or "=" in token or token.startswith(NOT_REPO):
        return False
    return token.startswith(PATH_PREFIXES) or (token.endswith(PATH_SUFFIXES) and "/" in token)


def expand_braces(pattern: str) -> list[str]:
    """`conf/x/{a,b}.yaml` -> the two paths (every brace group, as the shell does)."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def exists(pattern: str, base: Path) -> bool:
    """Every brace expansion of the path exists (`*` and `<placeholder>` match any name)."""
    for path in expand_braces(pattern.split("::")[0]):
        path = PLACEHOLDER.sub("*", path)
        if any(c in path for c in "*?["):
            if not list(base.glob(path.rstrip("/"))):
                return False
        elif not (base / path).exists():
            return False
    return True


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, title in HEADING.findall(prose(path)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_targets(path: Path) -> list[str]:
    return LINK.findall(prose(path))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_backticked_repository_paths_exist(page: Path) -> None:
    missing = sorted(
        {
            t
            for t in backticked_tokens(prose(page))
            if looks_like_repo_path(t) and not t.startswith(RUNTIME_OUTPUTS) and not exists(t, REPO)
        }
    )
    assert not missing, f"{rel(page)} names repository paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in link_targets(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if REPO not in resolved.parents:
            broken.append(f"{target} (outside the repository)")
        elif file_part and not exists(file_part, page.parent):
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with anchor #{anchor} in {rel(resolved)})")
    assert not broken, f"{rel(page)} has broken links: {broken}"


def group_table() -> dict[str, set[str]]:
    """group -> options, from the table under "## Config groups" in docs/configuration.md."""
    page = DOCS / "configuration.md"
    text = page.read_text()
    assert GROUPS_HEADING in text, f"{rel(page)}: no '{GROUPS_HEADING}' section"
    lines = text.split(GROUPS_HEADING, 1)[1].splitlines()[1:]
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    assert len(rows) > 2, f"{rel(page)}: no table under '{GROUPS_HEADING}'"
    table: dict[str, set[str]] = {}
    for row in rows[2:]:  # after the header and the |---| line
        match = GROUP_ROW.match(row)
        assert match, f"{rel(page)}: config-group row not in the form | `group` | `a`, `b` | notes |: {row[:100]}"
        group, options = match.groups()
        assert group not in table, f"{rel(page)}: config group `{group}` listed twice"
        table[group] = set(re.findall(r"`([^`]+)`", options))
    return table


def conf_groups() -> dict[str, set[str]]:
    """Every directory under conf/ (recursively) -> the stems of the YAML files directly in it."""
    return {
        str(d.relative_to(CONF_DIR)): {p.stem for p in d.glob("*.yaml")}
        for d in CONF_DIR.rglob("*")
        if d.is_dir() and d.name != "__pycache__"
    }


def test_config_group_table_matches_conf() -> None:
    table, conf = group_table(), conf_groups()
    where = "docs/configuration.md"
    problems = [f"group `{g}` is in conf/ but not in {where}" for g in sorted(conf.keys() - table.keys())]
    problems += [f"group `{g}` is in {where} but not in conf/" for g in sorted(table.keys() - conf.keys())]
    for group in sorted(conf.keys() & table.keys()):
        problems += [f"option `{o}` is in conf/{group}/ but not in {where}" for o in sorted(conf[group] - table[group])]
        problems += [f"option `{o}` is in {where} but not in conf/{group}/" for o in sorted(table[group] - conf[group])]
    assert not problems, "\n".join(problems)


def experiment_stage(name: str) -> str | None:
    """The `stage:` an experiment file sets, or inherits from the experiment its defaults list starts from."""
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("stage"):
        return data["stage"]
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and (CONF_DIR / "experiment" / f"{entry}.yaml").exists():
            return experiment_stage(entry)
    return None


STAGE_ROW = re.compile(r"^\| `([a-z_]+)` \| (`conf/experiment/.*?) \| `(src/metadiff/stages/\w+\.py)` \|$", re.M)


def test_readme_stage_table_covers_every_experiment() -> None:
    rows = STAGE_ROW.findall(README.read_text())
    assert rows, "README.md: no stage table (| `stage` | `conf/experiment/x.yaml`, ... | `src/metadiff/stages/x.py` |)"
    listed = {}
    for stage, files, module in rows:  # the module names its stage: `name="vae"`, or fewshot.py's STAGES tuple
        assert f'"{stage}"' in (REPO / module).read_text(), f"README.md: stage `{stage}` is not named in {module}"
        for name in re.findall(r"`conf/experiment/(\w+)\.yaml`", files):
            listed[name] = stage
    on_disk = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    problems = [f"conf/experiment/{n}.yaml is not in README.md's stage table" for n in sorted(on_disk - listed.keys())]
    problems += [
        f"README.md lists conf/experiment/{n}.yaml under `{listed[n]}`, but it runs stage `{experiment_stage(n)}`"
        for n in sorted(on_disk & listed.keys())
        if experiment_stage(n) != listed[n]
    ]
    assert not problems, "\n".join(problems)


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines, more than {MAX_README_LINES}: move text into docs/"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in link_targets(README)}
    unlinked = [rel(p) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link these docs pages: {unlinked}"
