"""The documents stay true to the tree: every file they name is there.

`README.md` and `docs/*.md` quote the figures of `docs/compare/*.json`, the jobs
and scripts that made them, and the tests that check a claim; a renamed file
would leave a figure without its source or a command that cannot run. Paths
are taken as the documents write them, brace lists expanded
(`docs/compare/x-seed{0,2}.json.gz`); a path with a placeholder (`<name>`,
`*`) is a pattern, not a file, and is skipped.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.$-])((?:docs|jobs|scripts|slurm|mpinewton|tests)/[\w./{},*<>$-]+)")
#: Named on purpose although absent: a user's own job in an example command.
EXAMPLES = {"jobs/other.toml"}


def expand(path: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (nested lists too), as the shell does."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    return [q for alt in match.group(1).split(",")
            for q in expand(path[:match.start()] + alt + path[match.end():])]


def quoted_paths(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in PATH.finditer(line):
            for path in expand(match.group(1)):
                path = path.rstrip(".,:;")
                if any(c in path for c in "*<>$") or path.endswith("/") or path in EXAMPLES:
                    continue
                found.append((number, path))
    return found


def test_expand_and_skip():
    assert expand("docs/x-seed{0,2}.json{,.gz}") == [
        "docs/x-seed0.json", "docs/x-seed0.json.gz", "docs/x-seed2.json", "docs/x-seed2.json.gz"]
    text = "see `docs/a.md`, tests/solvers/test_<method>.py and docs/b{1,2}.png."
    assert quoted_paths(text) == [(1, "docs/a.md"), (1, "docs/b1.png"), (1, "docs/b2.png")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_quoted_file_exists(document):
    missing = [f"{document.relative_to(ROOT)}:{line}: {path}"
               for line, path in quoted_paths(document.read_text())
               if not (ROOT / path).exists()]
    assert missing == []


def test_minibatch_stages_named_in_docs_exist():
    """Every ``scripts/compare-minibatch.sh STAGE`` in the documents is a stage the script runs.

    A stage removed with its option stays documented after a ``git checkout`` of
    the commit that had it, in the lines just before.
    """
    script = (ROOT / "scripts" / "compare-minibatch.sh").read_text()
    usage = re.search(r"# Usage: scripts/compare-minibatch\.sh \[([^\]]*)\]", script)
    assert usage is not None
    stages = set(usage.group(1).split("|"))
    named, unknown = 0, []
    for document in DOCUMENTS:
        lines = document.read_text().splitlines()
        for number, line in enumerate(lines):
            for stage in re.findall(r"scripts/compare-minibatch\.sh ([\w.-]+)", line):
                named += 1
                if stage in stages or re.sub(r"-seed\d+$", "", stage) in stages:
                    continue
                if not any("git checkout" in before for before in lines[max(0, number - 3):number]):
                    unknown.append(f"{document.name}:{number + 1}: {stage}")
    assert named > 0, "no stage named in the documents: the pattern no longer matches them"
    assert unknown == []


def anchor(title: str) -> str:
    """The anchor a Markdown renderer (GitHub's rule) gives a heading: lower case, spaces
    to hyphens, everything but letters, digits, ``_`` and ``-`` dropped."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_results_contents_list_every_section_with_its_anchor():
    """``docs/results.md`` opens with a contents list: one entry per section below the
    glance table, in order, each linking to its heading's anchor."""
    text = (ROOT / "docs" / "results.md").read_text()
    headings = [(len(m.group(1)), m.group(2)) for m in re.finditer(r"^(##+) (.*)$", text, re.M)
                if not m.group(2).startswith("At a glance")]
    block = text.split("**Contents**\n\n", 1)[1].split("\n\n", 1)[0]
    listed = [re.fullmatch(r"( *)- \[(.*)\]\(#(.*)\)", line).groups()
              for line in block.splitlines()]
    assert [(len(indent) // 2 + 2, title, link) for indent, title, link in listed] == \
        [(level, title, anchor(title)) for level, title in headings]
    assert anchor("The top eigenvalue of ResNet-50 at b = 256, and its memory") == \
        "the-top-eigenvalue-of-resnet-50-at-b--256-and-its-memory"
