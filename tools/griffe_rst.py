"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions:``): moepass's docstrings as Markdown.

The docstrings are Google style with a few reStructuredText habits that read well in ``help()``
and in the source but that Markdown shows literally.  Before mkdocstrings renders a docstring,
this turns

* roles — ``:class:`~moepass.policies.Policy```, ``:func:`x```, ``:mod:`a.b``` — into code spans
  (``Policy``, ``x``, ``a.b``; a ``~`` keeps the last name, as Sphinx does);
* a paragraph ending in ``::`` into one ending in ``:`` (a lone ``::`` line goes), the indented
  literal block after it staying an indented code block.

Double-backquoted literals (````x````) are code spans in Markdown as they are.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|const|ref):`(?P<body>[^`]+)`")


def _role(match: re.Match) -> str:
    body = match.group("body")
    shown = re.match(r"^(?P<text>.*?)\s*<(?P<target>[^>]+)>$", body)
    if shown:
        return f"`{shown.group('text')}`"
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return f"`{body}`"


def to_markdown(text: str) -> str:
    """A docstring's reST habits, written as Markdown (see the module docstring)."""
    lines = [line for line in text.split("\n") if line.strip() != "::"]
    lines = [line.rstrip()[:-1] if line.rstrip().endswith("::") else line for line in lines]
    return _ROLE.sub(_role, "\n".join(lines))


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
