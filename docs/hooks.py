"""MkDocs hook: lay the library's folders out as the installed ``actorbus`` package.

setup.cfg maps the top-level folders ``actors/``, ``bridge/`` and
``supervision/`` into the ``actorbus`` namespace. mkdocstrings reads the
source with griffe, which finds a package's modules in the folder of its
name only; so, as the Makefile does for mypy, the build reads a tree of
links laid out as installed: ``build/docs-api/actorbus/`` holds a link to
every module of ``actorbus/`` and one to each mapped folder.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

#: Folder of the checkout → its name under ``actorbus``, as setup.cfg maps them.
MAPPED = {"actors": "actors", "bridge": "bridge", "supervision": "supervision"}
#: Where the tree goes (``build/`` is ignored by git); mkdocs.yml's ``paths`` names it.
TREE = Path("build") / "docs-api"


@event_priority(100)  # before mkdocstrings reads its paths, in its own on_config
def on_config(config: Any) -> Any:
    root = Path(config.config_file_path).resolve().parent
    tree = root / TREE
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "actorbus"
    package.mkdir(parents=True)
    for module in sorted((root / "actorbus").glob("*.py")):
        (package / module.name).symlink_to(module)
    for folder, name in MAPPED.items():
        (package / name).symlink_to(root / folder, target_is_directory=True)
    return config


#: A Sphinx role before inline code, as the docstrings write cross-references
#: (``:class:`Envelope```); Markdown renders the role's name as text before the code.
_SPHINX_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """The API reference shows a docstring's ``:class:`X``` as ``X`` in code, without the role."""
    return _SPHINX_ROLE.sub("", html)
