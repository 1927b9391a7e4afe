"""The documentation a platform team reads: README's first screen (what it is, the quick
start) then a table of contents; docs/ with an index; every link between them lands on a file
and a heading that exist; and the pages that restate code (the containerd table, the state
file version, the project version) agree with it.
"""

import json
import re
import tomllib
from pathlib import Path

import pytest
from support.markdown import anchors, relative_links

from node_agent.containerd_versions import ConfigTomlAuth, support_for
from node_agent.ownership import STATE_VERSION

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
CHANGELOG = REPO / "CHANGELOG.md"
PAGES = [README, CHANGELOG, *sorted(DOCS.glob("*.md"))]

# What compatibility.md says for each action of node_agent/containerd_versions.py.
SAYS = {
    ConfigTomlAuth.WRITE: "written and kept in step",
    ConfigTomlAuth.WRITE_WITH_WARNING: "with a warning",
    ConfigTomlAuth.LEAVE_ALONE: "left alone",
}
# A containerd version each row of the compatibility table covers, as CRI reports it.
COMPATIBILITY_ROWS = {
    "1.6": ["1.6.20~ds1"],
    "1.7": ["1.7.24"],
    "2.0": ["v2.0.5"],
    "2.1 \u2013 2.3": ["2.1.0", "v2.3.2"],  # an en dash, as the page writes it
    "2.4 and later": ["2.4.0", "3.0.0"],
}


def sections(path: Path, level: str = "## ") -> list[str]:
    return [line[len(level) :] for line in path.read_text().splitlines() if line.startswith(level)]


def section(path: Path, title: str) -> str:
    return path.read_text().partition(f"\n## {title}\n")[2].partition("\n## ")[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell → the other cells, for every row of every Markdown table in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("- "):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_lands_on_a_file_and_heading_that_exist(page: Path) -> None:
    for link in relative_links(page):
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        assert target.exists(), f"{page.name}: {link}: no such file"
        if anchor:
            assert target.suffix == ".md", f"{page.name}: {link}: an anchor in a non-Markdown file"
            assert anchor in anchors(target.read_text()), f"{page.name}: {link}: no such heading"


def test_the_link_check_catches_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Which containerd: config.toml auth\n\n[x](#which-containerd)\n")
    assert relative_links(page) == ["#which-containerd"]
    assert "which-containerd" not in anchors(page.read_text())
    assert "which-containerd-configtoml-auth" in anchors(page.read_text())


def test_the_readme_opens_with_what_it_is_and_the_quick_start_then_the_contents() -> None:
    text = README.read_text()
    intro = text.partition("\n## ")[0]
    assert intro.startswith("# node-agent\n") and "registry pull credentials" in intro
    assert sections(README)[:2] == ["Quick start", "Contents"]
    quick_start = section(README, "Quick start")
    assert "make demo" in quick_start and "make test" in quick_start


def test_the_contents_link_every_readme_section_and_the_docs_index() -> None:
    contents = section(README, "Contents")
    links = set(re.findall(r"\]\(([^)]+)\)", contents))
    for title in sections(README)[2:]:
        (anchor,) = anchors(f"## {title}\n")
        assert f"#{anchor}" in links, f"README Contents: no link to '{title}'"
    assert "docs/README.md" in links


def test_the_docs_index_lists_every_page_in_docs() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"


def test_the_compatibility_matrix_says_what_the_containerd_table_in_the_code_does() -> None:
    rows = table_rows(section(DOCS / "compatibility.md", "containerd"))
    for row, versions in COMPATIBILITY_ROWS.items():
        assert row in rows, f"compatibility.md: no row for containerd {row}"
        for version in versions:
            said = SAYS[support_for(version).auth]
            assert said in rows[row][0], f"containerd {version}: the code does '{said}'"


def test_the_upgrade_page_names_the_state_file_version_the_agent_writes() -> None:
    text = (DOCS / "upgrading.md").read_text()
    (example,) = re.findall(r"```json\n(.*?)```", text, re.DOTALL)
    assert json.loads(example)["version"] == STATE_VERSION
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert table_rows(section(DOCS / "upgrading.md", "State file format"))[version] == [
        str(STATE_VERSION),
        "the first format",
    ]


def test_the_changelog_has_a_section_for_the_project_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version in sections(CHANGELOG)
