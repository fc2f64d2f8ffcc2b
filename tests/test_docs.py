"""The documentation site's pages: every Python snippet runs as pasted, and what they say holds.

Each page's ```python blocks are run as README's are (tests/test_readme.py):
written to a folder of the page's own, a block whose first line is
``# <name>.py`` under that name, the others as ``snippet_<n>.py``, then run
in order with ``NATS_URL`` pointing at the test's own nats-server; a block
saved as ``test_<name>.py`` (the testing kit's page) is run by
``python -m pytest`` there instead, with the kit's plugin and server. The
folder also holds README's ``myapp.py``: the pages' snippets say they sit
beside it, as the tour leaves it.

There is no way to mark a block "not run": whatever is not meant to run is
written in a block of another language (``sh``, or none), so every block a
reader may paste as Python has run here. The site itself is built with
``mkdocs build --strict`` by ``make docs`` (part of ``make test``), which
fails on a broken link or anchor.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import actorbus
from tests.support import ended_afterwards, stop_with_sigterm, wait_for, wait_until_gone
from tests.test_cli import ACTORBUS
from tests.test_layers import LEAF
from tests.test_readme import (README, ROOT, is_test_file, python_blocks, python_fences, run_pytest,
                               saved_name)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
WITH_SNIPPETS = [page.name for page in PAGES if python_blocks(page.read_text())]


def test_the_pages_have_the_snippets_this_test_runs():
    assert len(PAGES) >= 10 and (DOCS / "index.md").exists()
    for page in PAGES:
        text = page.read_text()
        # Every fence is a block the regex finds, so none goes unseen.
        assert len(python_blocks(text)) == python_fences(text), page.name
        # A fence the test would not run, though a reader would paste it as Python.
        assert not re.search(r"^ *```(py|py3|python3|pycon|ipython)\b", text, re.M), page.name
        for block in python_blocks(text):
            assert not ("4222" in block and "NATS_URL" not in block), f"{page.name}: a hard-coded server"
    # using, wire format, supervision, security, scale-out, operations, contributing.
    assert sum(len(python_blocks(page.read_text())) for page in PAGES) >= 10
    assert len(WITH_SNIPPETS) >= 7


def test_the_parts_a_page_takes_from_readme_are_marked_there():
    readme = README.read_text()
    included = [(page.name, section) for page in PAGES
                for section in re.findall(r'^--8<-- "README\.md:([a-z][-_0-9a-z]*)"$',
                                          page.read_text(), re.M)]
    assert ("index.md", "tour") in included and ("index.md", "quickstart") in included
    for page, section in included:
        start = readme.find(f"<!-- --8<-- [start:{section}] -->")
        end = readme.find(f"<!-- --8<-- [end:{section}] -->")
        assert 0 <= start < end, f"{page} takes README's section {section!r}, which is not marked"
        # The site places the part in docs/: a link relative to README's folder would break.
        assert "](docs/" not in readme[start:end], f"README's section {section!r} links into docs/"


def test_the_api_reference_covers_everything_actorbus_exports():
    text = (DOCS / "api.md").read_text()
    listed = re.search(r"^::: actorbus\n(?:    .*\n)*?      members:\n((?:        - \w+\n)+)", text, re.M)
    assert listed, "api.md has no member list under '::: actorbus'"
    assert sorted(re.findall(r"- (\w+)", listed.group(1))) == sorted(actorbus.__all__)


@pytest.mark.parametrize("page", ["contributing.md", "layout.md"])
def test_the_layers_name_the_leaf_modules_test_layers_enforces(page):
    text = (DOCS / page).read_text()
    leaf = text[text.index("leaf values"):]
    leaf = leaf[:leaf.index("```")]
    assert set(re.findall(r"\.(\w+)", leaf)) == {module.rsplit(".", 1)[1] for module in LEAF}


@pytest.mark.integration
@pytest.mark.parametrize("page", WITH_SNIPPETS)
def test_every_snippet_of_a_page_runs_as_pasted(page, tmp_path, nats_server):
    env = {**os.environ, "NATS_URL": nats_server.url}
    tour = python_blocks(README.read_text())[0]
    (tmp_path / "myapp.py").write_text(tour)
    for number, block in enumerate(python_blocks((DOCS / page).read_text())):
        path = tmp_path / saved_name(block, number)
        assert not path.exists(), f"{page}: two snippets are saved as {path.name}"
        path.write_text(block)
        if is_test_file(path.name):
            result = run_pytest(tmp_path, path.name)
            assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout
        else:
            result = subprocess.run([sys.executable, path.name], check=False, cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{page}, {path.name}:\n{block}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{page}, {path.name}:\n{result.stderr}"


@pytest.mark.integration
def test_actorbus_run_of_the_examples_works_only_from_the_checkout_root(tmp_path, nats_server):
    # As docs/examples.md says: elsewhere, `examples` does not import, in one line.
    result = subprocess.run([ACTORBUS, "run", "examples.orders:topology", "--servers",
                             nats_server.url], check=False, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot import 'examples.orders': No module named 'examples'" in result.stderr
    assert "run it from the folder that holds the module" in result.stderr
    assert "Traceback" not in result.stderr
    assert "`actorbus run examples.orders:topology --servers URL`, from the checkout's root only" \
        in (DOCS / "examples.md").read_text()

    out_path = tmp_path / "root.txt"
    with open(out_path, "w") as out:
        process = subprocess.Popen([ACTORBUS, "run", "examples.orders:topology", "--servers",
                                    nats_server.url], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    with ended_afterwards(process):
        wait_for(lambda: "running examples.orders:topology" in out_path.read_text(), timeout=60,
                 what="the example topology, from the root")
        code, tree = stop_with_sigterm(process)
        assert code == 0
    wait_until_gone(tree, "every process of the example to exit")
