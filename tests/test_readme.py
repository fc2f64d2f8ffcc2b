"""README.md's Python snippets run as pasted, beside the tour's `actorbus run`.

Every ```python block is written to a folder of its own (a block whose first
line is ``# <name>.py`` under that name, as README tells the reader to save
it), then run with ``NATS_URL`` pointing at the test's server, the variable
the snippets read, while the tour's ``actorbus run myapp:topology`` runs there.
A block saved as ``test_<name>.py`` is a test file for the testing kit: it is
run by ``python -m pytest`` in a project folder holding nothing else, as a
user who installed ``actorbus[testing]`` runs it (the plugin comes from its
entry point). The pages of docs/ are run the same way by tests/test_docs.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ended_afterwards, stop_with_sigterm, wait_for, wait_until_gone
from tests.test_cli import ACTORBUS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of ``text``, dedented (the tour's are indented in a list)."""
    blocks = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
        indent = len(match.group(1))
        blocks.append("\n".join(line[indent:] for line in match.group(2).splitlines()) + "\n")
    return blocks


def saved_name(block: str, number: int) -> str:
    """The file a block is saved as: the name its first line gives, else ``snippet_<n>.py``."""
    named = re.match(r"# (\w+\.py)\b", block)
    return named.group(1) if named else f"snippet_{number}.py"


def is_test_file(name: str) -> bool:
    """A block saved as ``test_<name>.py`` is run by pytest, not as a script."""
    return name.startswith("test_")


def run_pytest(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m pytest`` in ``folder``, as a user runs it: none of this run's pytest settings
    (``PYTEST_*``) leak in, and the testing kit is loaded through its entry point; ``env`` adds
    variables."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=folder, env={**environ, **(env or {})}, capture_output=True, text=True,
                          timeout=170, check=False)


def python_fences(text: str) -> int:
    """How many lines open a ```python block, counted without the block regex."""
    return sum(line.strip() == "```python" for line in text.splitlines())


def test_readme_has_the_snippets_this_test_runs():
    text = README.read_text()
    blocks = python_blocks(text)
    # The tour's two (myapp.py first: the others import it), the configuration's one and the
    # testing kit's test file; every fence is a block the regex finds, so none is skipped unseen.
    assert len(blocks) == 4 == python_fences(text)
    assert blocks[0].startswith("# myapp.py\n")
    assert [saved_name(b, n) for n, b in enumerate(blocks) if is_test_file(saved_name(b, n))] == \
        ["test_orders.py"]
    assert not any("4222" in b and "NATS_URL" not in b for b in blocks), "a hard-coded server"


def test_the_first_test_of_the_testing_kit_takes_at_most_15_lines():
    test_file = python_blocks(README.read_text())[3]
    first = test_file[:test_file.index("\ndef test_", test_file.index("def test_"))].rstrip()
    assert "publish_events" in first and "wait_until_handled(3)" in first and "assert" in first
    assert len(first.splitlines()) <= 15, first


def test_readme_is_the_front_door():
    # The reference lives in docs/; README keeps to the quick start, the tour and a summary.
    assert len(README.read_text().splitlines()) <= 250


def test_every_readme_snippet_runs_as_pasted(tmp_path, nats_server):
    env = {**os.environ, "NATS_URL": nats_server.url}
    scripts = []
    for number, block in enumerate(python_blocks(README.read_text())):
        path = tmp_path / saved_name(block, number)
        if is_test_file(path.name):
            continue   # a test file for pytest: test_readme_test_file_passes_in_a_project_of_its_own
        path.write_text(block)
        scripts.append(path)

    out_path = tmp_path / "run.txt"
    with open(out_path, "w") as out:
        tour = subprocess.Popen([ACTORBUS, "run", "myapp:topology", "--servers", nats_server.url],
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    with ended_afterwards(tour):
        wait_for(lambda: "running myapp:topology" in out_path.read_text(), timeout=60,
                 what="the tour's topology")
        for script in scripts:
            result = subprocess.run([sys.executable, script.name], check=False, cwd=tmp_path,
                                    env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (f"{script.name}:\n{script.read_text()}\n"
                                            f"{result.stdout}\n{result.stderr}")
            assert "Traceback" not in result.stderr, result.stderr
        # The tour's publish reached its Account aggregates: balances grow in order.
        wait_for(lambda: "acct-1 22" in out_path.read_text(), timeout=30,
                 what="acct-1's final balance (1+4+7+10)")
        code, tree = stop_with_sigterm(tour)
        assert code == 0
    wait_until_gone(tree, "every process of the tour to exit")


def test_readme_test_file_passes_in_a_project_of_its_own(tmp_path):
    # A new user's project: the test file written from README, nothing else; the kit's plugin
    # comes from the installed package's entry point and starts its own nats-server.
    [(name, block)] = [(saved_name(b, n), b) for n, b in enumerate(python_blocks(README.read_text()))
                       if is_test_file(saved_name(b, n))]
    project = tmp_path / "project"
    project.mkdir()
    (project / name).write_text(block)

    result = run_pytest(project, "--actorbus-runtime", "simple,processes", "-q")

    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "4 passed" in result.stdout   # its two tests, on each runtime
    left = sorted(p.name for p in project.iterdir() if p.name != "__pycache__")
    assert left == [name]   # no store, record or log left behind
