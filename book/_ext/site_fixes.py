"""Two fixes to the HTML pages that Jupyter Book 1.0.4 and sphinx-book-theme 1.3 produce.

1. Launch buttons. The book renders the executed copies in ``executed/``, which are build
   outputs and not committed, so the theme's Colab and Binder links (built from the page
   name) would open ``executed/<name>.ipynb``, a path that does not exist in the
   repository. They are rewritten to ``notebooks/<name>.ipynb``, the committed notebook.
2. Duplicate scripts. sphinx-thebe 0.3.1 registers its inline configuration script after
   the HTML builder has started, so every page carried it twice and the browser raised
   "Identifier 'THEBE_JS_URL' has already been declared". Each page keeps one copy of
   every script.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

EXECUTED = "executed/"
SOURCES = "notebooks/"


def _rewrite(button: dict[str, Any]) -> None:
    url = button.get("url")
    if isinstance(url, str) and EXECUTED in url:
        button["url"] = url.replace(EXECUTED, SOURCES)
    for child in button.get("buttons", []):
        _rewrite(child)


def point_launch_buttons_at_sources(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Rewrite ``executed/`` to ``notebooks/`` in the launch buttons of an executed page."""
    if not pagename.startswith(EXECUTED):
        return
    for button in context.get("header_buttons", []):
        if button.get("label") == "launch-buttons":
            _rewrite(button)


def drop_duplicate_scripts(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """Keep the first of the script entries with the same file and attributes.

    The duplicates are inline scripts whose file name is ``None`` in one copy and ``""`` in
    the other, so Sphinx's own check does not catch them.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen = set()
    unique = []
    for script in scripts:
        key = (getattr(script, "filename", script) or "",
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict[str, Any]:
    # sphinx-book-theme adds the launch buttons at priority 501; run after it.
    app.connect("html-page-context", point_launch_buttons_at_sources, priority=600)
    # Last, after every extension has added its scripts for the page.
    app.connect("html-page-context", drop_duplicate_scripts, priority=999)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
