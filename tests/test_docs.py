"""Every ```python block of README.md and docs/*.md runs; api.md names every public name; every name
and file architecture.md cites exists.

Each block runs on its own (imports included), in a fresh namespace, with a temporary folder as
the working directory and a time limit. A block whose first line is ``# requires: data`` needs
real data or weights: it is only compiled.
"""
from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

import relevance_finetune
from relevance_finetune import augment, gae, losses, recipes, viz

ROOT = Path(__file__).resolve().parents[1]
REQUIRES_DATA = "# requires: data"
BLOCK_SECONDS = 60  # generous: a loaded CI machine; the examples take seconds
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


class Block(NamedTuple):
    path: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def needs_data(self) -> bool:
        return self.code.lstrip().startswith(REQUIRES_DATA)


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, with the line number of their first code line."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        indent = len(match["indent"])
        code = "".join(line[indent:] for line in match["code"].splitlines(keepends=True))
        blocks.append(Block(path, text.count("\n", 0, match.start("code")) + 1, code))
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


ALL_BLOCKS = [block for path in doc_files() for block in python_blocks(path)]


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s: shrink the example")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_block(block: Block) -> None:
    """Compile ``block``; run it unless it is marked as needing data."""
    compiled = compile(block.code, block.name, "exec")
    if not block.needs_data:
        with time_limit(BLOCK_SECONDS, block.name):
            exec(compiled, {"__name__": "__main__"})


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.name for b in ALL_BLOCKS])
def test_doc_block(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block(block)


def test_blocks_are_found_and_failures_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  raise KeyError('boom')\n  ```\n\n"
                    "```python\n# requires: data\nimport no_such_package\n```\n\n```bash\nexit 1\n```\n")
    first, second, third = python_blocks(page)
    assert (first.line, first.code, second.line, third.needs_data) == (4, "x = 1\n", 10, True)
    run_block(first)
    run_block(third)  # compiled only
    with pytest.raises(KeyError, match="boom"):
        run_block(second)
    with pytest.raises(SyntaxError):
        run_block(Block(page, 1, "# requires: data\nfor\n"))
    with pytest.raises(TimeoutError, match="shrink the example"), time_limit(1, "loop"):
        while True:
            pass


def test_readme_and_docs_have_runnable_examples():
    runnable = {b.path.name for b in ALL_BLOCKS if not b.needs_data}
    assert {"README.md", "index.md", "api.md"} <= runnable


@pytest.mark.parametrize("module", [relevance_finetune, augment, gae, losses, recipes, viz], ids=lambda m: m.__name__)
def test_api_md_names_every_public_name(module):
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in module.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document {module.__name__}: {missing}"


def test_architecture_md_cites_only_names_and_files_that_exist():
    """A name in backquotes (``name`` or ``name(...)``) occurs in the project's Python files, and a
    cited ``file.py`` is one of them: the map of the code follows the code."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = [path for folder in ("relevance_finetune", "tests", "benchmarks", "examples")
             for path in (ROOT / folder).rglob("*.py")]
    source = "\n".join(path.read_text(encoding="utf-8") for path in files)
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\([^`]*\))?`", text))
    missing = sorted(name for name in names if not re.search(rf"\b{re.escape(name)}\b", source))
    assert not missing, f"docs/architecture.md cites names the code does not have: {missing}"
    cited = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*\.py)\b", text))
    absent = sorted(cited - {path.name for path in files})
    assert not absent, f"docs/architecture.md cites files that do not exist: {absent}"
