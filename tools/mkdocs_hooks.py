"""MkDocs hooks (mkdocs.yml ``hooks:``): pages that show a file kept elsewhere in the repository.

A page says ``<!-- include: PATH [section=NAME] [shift=N] -->`` on a line of its own and the
hook puts the file's text there when the site is built, so the file stays the one source:

* ``<!-- include: README.md -->`` (the home page): the README as GitHub shows it;
* ``<!-- include: benchmarks/RESULTS.md shift=1 -->`` (the benchmarks page): every result the
  benchmark scripts wrote, headings one level down;
* ``section=NAME`` takes only the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
  (the markers the benchmark scripts write RESULTS.md's sections between).

Links inside the included text are relative to the included file.  They are rewritten for the
page: a link into ``docs/`` points at that page, a link to another included file at the page
that includes it whole, an image outside ``docs/`` is copied into the site.  Any other link out
of ``docs/`` (a source file, a folder) is an error, so the strict build fails instead of
publishing a link that leads nowhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

_DIRECTIVE = re.compile(r"^<!-- include: (?P<path>\S+)(?P<args>(?: \w+=\S+)*) -->$", re.M)
_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}
#: Where images from outside docs/ land in the site.
_ASSETS = "_included"

_state: dict = {}


def _parse(match: re.Match) -> tuple[str, dict[str, str]]:
    args = dict(a.split("=", 1) for a in match.group("args").split())
    unknown = set(args) - {"section", "shift"}
    if unknown:
        raise PluginError(f"include of {match.group('path')}: unknown argument(s) {sorted(unknown)}")
    return match.group("path"), args


def on_config(config, **kwargs):
    docs = Path(config["docs_dir"]).resolve()
    _state.update(root=docs.parent, docs=docs, whole={})
    # which page includes which file whole: links to that file lead to that page
    for page in docs.rglob("*.md"):
        for match in _DIRECTIVE.finditer(page.read_text()):
            path, args = _parse(match)
            if "section" not in args:
                _state["whole"][path] = page.relative_to(docs).as_posix()
    return config


def _section(text: str, name: str, path: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise PluginError(f"{path} has no section {name!r} (no {start} … {end} markers)")
    return text[text.index(start) + len(start) : text.index(end)].strip("\n") + "\n"


def _rewrite_links(text: str, included: str, page: str) -> str:
    """Links of ``included`` (a repository path) made relative to ``page`` (a docs/ path)."""
    root, docs = _state["root"], _state["docs"]
    page_dir = PurePosixPath(page).parent

    def relative(target_in_docs: str) -> str:
        return os.path.relpath(target_in_docs, page_dir.as_posix() or ".").replace(os.sep, "/")

    def one(match: re.Match) -> str:
        target = match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)  # a URL, or an anchor on the same page
        path, _, anchor = target.partition("#")
        resolved = (root / PurePosixPath(included).parent / path).resolve()
        try:
            in_repo = resolved.relative_to(root).as_posix()
        except ValueError:
            raise PluginError(f"{included}: link {target!r} leaves the repository") from None
        if resolved.is_relative_to(docs):
            new = relative(resolved.relative_to(docs).as_posix())
        elif in_repo in _state["whole"]:
            new = relative(_state["whole"][in_repo])
        elif resolved.suffix.lower() in _IMAGE_SUFFIXES and resolved.is_file():
            new = relative(f"{_ASSETS}/{in_repo}")
        else:
            raise PluginError(
                f"{included}: link {target!r} points outside docs/ at something the site does not have; "
                "link a docs page, or write the path as code"
            )
        return f"{match.group('bang')}[{match.group('text')}]({new}{'#' + anchor if anchor else ''})"

    # code blocks are left as they are
    pieces, last = [], 0
    for fence in _FENCE.finditer(text):
        pieces.append(_LINK.sub(one, text[last : fence.start()]))
        pieces.append(fence.group(0))
        last = fence.end()
    pieces.append(_LINK.sub(one, text[last:]))
    return "".join(pieces)


def on_page_markdown(markdown, page, config, files, **kwargs):
    def include(match: re.Match) -> str:
        path, args = _parse(match)
        source = _state["root"] / path
        if not source.is_file():
            raise PluginError(f"{page.file.src_uri}: include of {path}: no such file")
        text = source.read_text()
        if "section" in args:
            text = _section(text, args["section"], path)
        shift = int(args.get("shift", 0))
        if shift:
            parts = _FENCE.split(text)
            fences = _FENCE.findall(text)
            parts = [re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", p, flags=re.M) for p in parts]
            text = "".join(p + (fences[i] if i < len(fences) else "") for i, p in enumerate(parts))
        return _rewrite_links(text, path, page.file.src_uri)

    return _DIRECTIVE.sub(include, markdown)


def on_files(files, config, **kwargs):
    """Images that included files show from outside docs/, as site files under ``_included/``."""
    root, docs, seen = _state["root"], _state["docs"], set()
    for path in _included_paths():
        for match in _LINK.finditer((root / path).read_text()):
            target = (root / PurePosixPath(path).parent / match.group("target").partition("#")[0]).resolve()
            if not match.group("bang") or target.suffix.lower() not in _IMAGE_SUFFIXES or not target.is_file():
                continue
            if target.is_relative_to(docs) or target in seen:
                continue
            seen.add(target)
            uri = f"{_ASSETS}/{target.relative_to(root).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(target)))
    return files


def _included_paths() -> list[str]:
    paths = set()
    for page in _state["docs"].rglob("*.md"):
        paths.update(_parse(m)[0] for m in _DIRECTIVE.finditer(page.read_text()))
    return sorted(paths)
