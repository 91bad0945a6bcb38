"""Sphinx configuration of the hookrt documentation.

Build it from the repository root with::

    python -m sphinx -W -b html docs/source docs/_build/html

The pages import hookrt from this checkout, so the API reference and the
generated event catalog describe the code next to them.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..")))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import hookrt  # noqa: E402 - the path above must be set first

project = "hookrt"
author = "the hookrt authors"
copyright = "the hookrt authors"  # noqa: A001 - the name Sphinx reads
release = hookrt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "hookrt_catalog",
]

# Docstrings are Google style; type hints are shown in the signatures.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"member-order": "bysource"}

# `hookrt.Bus` in single backticks links to the API reference; an unknown name renders as code.
default_role = "py:obj"

exclude_patterns = ["_build", "_ext"]
html_theme = "alabaster"
html_title = f"hookrt {release}"
