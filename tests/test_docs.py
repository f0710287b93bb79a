"""The documentation against the code and against itself, so that neither drifts.

- docs/CONFIGURATION.md lists exactly the keys of the shipped config.ini,
  with the same defaults;
- every relative link and #anchor in README.md and docs/*.md points to a
  file and heading that exist (GitHub's anchor rules);
- docs/OPERATIONS.md lists every log Type and every statsd metric name the
  code can emit, and nothing the code cannot emit.

Types and metric names are collected from the source with `ast`, not by
running the server: every call that logs an event or sends a metric is
found, and its name read from the literal argument. Where the name is built
at run time, the call site must be listed in DYNAMIC_TYPES or
DYNAMIC_METRICS with the values it can take, read from the objects the
code uses (so a new Route or refusal counter is seen); an unlisted dynamic
site fails the test rather than being skipped.
"""

from __future__ import annotations

import ast
import configparser
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simplepush import web, webpush_endpoint
from simplepush.tokens import is_valid_key

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "simplepush"
CONFIG = ROOT / "config.ini"
CONFIGURATION = ROOT / "docs" / "CONFIGURATION.md"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# --- markdown helpers ---------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a markdown file, fenced code blocks left out."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation dropped, spaces to '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML is not part of the text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor a link may use into this file; repeated headings get -1, -2, ..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    for number, line in prose_lines(path):
        text = _CODE_SPAN.sub("", line)
        for match in _LINK.finditer(text):
            yield number, match.group(2)
        reference = _REFERENCE.match(text)
        if reference:
            yield number, reference.group(1)


def tables_under(path: Path, heading: str) -> list[list[list[str]]]:
    """The tables between the heading whose text is `heading` and the next heading
    of the same or a higher level: each a list of rows of stripped cells, the
    header and its separator row left out."""
    lines = list(prose_lines(path))
    level = None
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for _, line in lines:
        match = _HEADING.match(line)
        if match:
            if level is not None and len(match.group(1)) <= level:
                break
            if match.group(2) == heading:
                level = len(match.group(1))
            continue
        if level is None:
            continue
        if line.lstrip().startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                current.append(cells)  # the header, dropped below
            elif all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                continue
            else:
                current.append(cells)
        else:
            current = None
    assert level is not None, f"{path.name}: no heading {heading!r}"
    return [table[1:] for table in tables]


def code_span(cell: str) -> str | None:
    """The text of a cell that is exactly one `code span`, else None."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    return match.group(1) if match else None


# --- docs/CONFIGURATION.md and config.ini -------------------------------------

EMPTY = "(empty)"
# install.sh once wrote a fresh key into config.ini itself; such a checkout
# still holds one there. It is a secret, not a default: the default is empty.
SECRETS = {("server", "token_key")}


def shipped_config() -> dict[tuple[str, str], str]:
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, default_section="\0"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(CONFIG, encoding="utf-8")
    return {
        (section, key): value.strip()
        for section in parser.sections()
        for key, value in parser.items(section)
    }


def documented_config() -> dict[tuple[str, str], str]:
    """`## [section]` headings, each with a table of `key` | default | meaning rows.

    A default is one `code span` holding the value as config.ini spells it,
    or (empty).
    """
    documented: dict[tuple[str, str], str] = {}
    sections = [
        match.group(2)
        for _, line in prose_lines(CONFIGURATION)
        if (match := _HEADING.match(line)) and len(match.group(1)) == 2
    ]
    for heading in sections:
        section = re.fullmatch(r"`?\[(\w+)\]`?", heading)
        if section is None:
            continue
        for table in tables_under(CONFIGURATION, heading):
            for cells in table:
                key, default = code_span(cells[0]), cells[1]
                assert key is not None, f"[{section.group(1)}]: key cell {cells[0]!r}"
                value = "" if default == EMPTY else code_span(default)
                assert value is not None, f"[{section.group(1)}] {key}: default {default!r}"
                where = (section.group(1), key)
                assert where not in documented, f"{where} documented twice"
                documented[where] = value
    return documented


def test_configuration_reference_lists_every_key_of_config_ini():
    shipped, documented = shipped_config(), documented_config()
    assert shipped, "config.ini has no keys"
    missing = sorted(set(shipped) - set(documented))
    extra = sorted(set(documented) - set(shipped))
    assert not missing, f"in config.ini, not in docs/CONFIGURATION.md: {missing}"
    assert not extra, f"in docs/CONFIGURATION.md, not in config.ini: {extra}"


def test_configuration_reference_gives_config_ini_defaults():
    shipped, documented = shipped_config(), documented_config()
    for where in sorted(set(shipped) & set(documented)):
        value = shipped[where]
        if where in SECRETS and value and all(is_valid_key(k.strip()) for k in value.split(",")):
            value = ""  # a key install.sh wrote, not the default
        assert documented[where] == value, (
            f"[{where[0]}] {where[1]}: config.ini says {value!r},"
            f" docs/CONFIGURATION.md says {documented[where]!r}"
        )


# --- links and anchors ----------------------------------------------------------


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for number, target in links(path):
        if not target or _SCHEME.match(target):
            continue  # http:, https:, mailto: are not checked here
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"line {number}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"line {number}: {target}: no heading with that anchor")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Sizing a deployment: simplepush-bench", "sizing-a-deployment-simplepush-bench"),
        ("6. The dashboard", "6-the-dashboard"),
        ("`[server]`", "server"),
        ("Errors: 4xx and 5xx", "errors-4xx-and-5xx"),
        ("The `data` key (≤ 4096 bytes)", "the-data-key--4096-bytes"),
        ("Use it with Firefox", "use-it-with-firefox"),
    ],
)
def test_slug_follows_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A\n## Notes\n```\n# not a heading\n```\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"a", "notes", "notes-1"}


# --- log Types and metric names in docs/OPERATIONS.md ----------------------------


def _routes() -> list[web.Route]:
    return [value for value in vars(web).values() if isinstance(value, web.Route)]


# (file, the call's argument as ast.unparse spells it) -> the names it can be.
DYNAMIC_TYPES: dict[tuple[str, str], Callable[[], set[str]]] = {
    # A crash in a PUT, POST or DELETE is logged under its Route's Type.
    ("web.py", "route.error_type"): lambda: {route.error_type for route in _routes()},
}
DYNAMIC_METRICS: dict[tuple[str, str], Callable[[], set[str]]] = {
    # A crash in a POST counts under its Route's metric; a PUT's has none.
    ("web.py", "route.metric"): lambda: {r.metric for r in _routes() if r.metric is not None},
    # A refused POST counts under its status's counter.
    ("webpush_endpoint.py", "counter"): lambda: {
        counter for counter, _ in webpush_endpoint._REFUSALS.values()
    },
}
# Where the emitting functions themselves are defined: their argument is the caller's.
EMITTERS = {("logs.py", "event"), ("logs.py", "exception")}
# Loggers the code names, as the Type a record without an event Type gets (the logger's name).
_LOGGER_NAMES = {"log": "simplepush"}
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
_METRIC_METHODS = {"incr", "timing", "gauge"}


class _Collector(ast.NodeVisitor):
    """Types and metric names one module can emit, and the call sites it could not read."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.types: set[str] = set()
        self.metrics: set[str] = set()
        self.unread: list[str] = []
        self._function: list[str] = []
        self._from_logs: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._function.append(node.name)
        self.generic_visit(node)
        self._function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _in_emitter(self) -> bool:
        return any((self.module, name) in EMITTERS for name in self._function)

    def _names(self, node: ast.expr, dynamic: dict, what: str, line: int) -> set[str]:
        """The string(s) an argument can be: literals, both arms of `a if c else b`, or DYNAMIC."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.IfExp):
            return self._names(node.body, dynamic, what, line) | self._names(
                node.orelse, dynamic, what, line
            )
        source = ast.unparse(node)
        values = dynamic.get((self.module, source))
        if values is None:
            self.unread.append(f"simplepush/{self.module}:{line}: {what} {source}")
            return set()
        return values()

    def visit_Dict(self, node: ast.Dict) -> None:
        # A record made by hand carries its Type as extra={"event_type": ...}.
        for key, value in zip(node.keys, node.values, strict=True):
            typed = isinstance(key, ast.Constant) and key.value == "event_type"
            if typed and not self._in_emitter():
                self.types |= self._names(value, DYNAMIC_TYPES, "Type", node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        line = node.lineno
        if self._in_emitter():
            pass
        elif self._is_logs(func, "event"):
            # logs.event(level, type_, **fields)
            self.types |= self._names(node.args[1], DYNAMIC_TYPES, "Type", line)
        elif self._is_logs(func, "exception"):
            # logs.exception(type_)
            self.types |= self._names(node.args[0], DYNAMIC_TYPES, "Type", line)
        elif isinstance(func, ast.Attribute) and func.attr in _LOG_METHODS:
            logger = self._logger_name(func.value)
            has_type = any(
                keyword.arg == "extra"
                and isinstance(keyword.value, ast.Dict)
                and any(
                    isinstance(k, ast.Constant) and k.value == "event_type"
                    for k in keyword.value.keys
                )
                for keyword in node.keywords
            )
            if logger is not None and not has_type:
                # No event Type: the envelope's Type is the logger's name, the text Fields.msg.
                self.types.add(logger)
        elif (
            isinstance(func, ast.Attribute)
            and func.attr in _METRIC_METHODS
            and self._is_metrics(func.value)
        ):
            self.metrics |= self._names(node.args[0], DYNAMIC_METRICS, "metric", line)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "simplepush.logs" or (self.module == "logs.py" and node.level):
            self._from_logs.update(alias.asname or alias.name for alias in node.names)

    def _is_logs(self, func: ast.expr, name: str) -> bool:
        """`name(...)` imported from simplepush.logs (or defined there), or `logs.name(...)`."""
        if isinstance(func, ast.Name):
            return func.id == name and (name in self._from_logs or self.module == "logs.py")
        return (
            isinstance(func, ast.Attribute)
            and func.attr == name
            and isinstance(func.value, ast.Name)
            and func.value.id == "logs"
        )

    @staticmethod
    def _logger_name(node: ast.expr) -> str | None:
        """`logging.getLogger("name")` or a module-level logger the code names, else None."""
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "getLogger"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            return str(node.args[0].value)
        if isinstance(node, ast.Name):
            return _LOGGER_NAMES.get(node.id)
        return None

    @staticmethod
    def _is_metrics(node: ast.expr) -> bool:
        """`metrics`, `node.metrics`, `self._metrics`, `self._node.metrics`, ..."""
        name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
        return name in ("metrics", "_metrics")


def emitted() -> tuple[set[str], set[str], list[str]]:
    types: set[str] = set()
    metrics: set[str] = set()
    unread: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        collector = _Collector(str(path.relative_to(PACKAGE)))
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        types |= collector.types
        metrics |= collector.metrics
        unread += collector.unread
    return types, metrics, unread


def documented_names(heading: str) -> set[str]:
    """The first column of the tables under a heading of docs/OPERATIONS.md, as code spans."""
    names = set()
    for table in tables_under(OPERATIONS, heading):
        for cells in table:
            name = code_span(cells[0])
            assert name is not None, f"{heading}: first cell {cells[0]!r} is not one `name`"
            names.add(name)
    return names


def test_every_log_type_and_metric_is_read_from_the_code():
    """A name built at run time must be listed, with the values it can take, above."""
    _, _, unread = emitted()
    assert not unread, "add these call sites to DYNAMIC_TYPES or DYNAMIC_METRICS:\n" + "\n".join(
        unread
    )


def test_dynamic_sites_still_exist_and_give_names():
    """A DYNAMIC entry whose call site is gone, or that yields nothing, is stale."""
    used: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.expr):
                used.add((module, ast.unparse(node)))
    for site, values in {**DYNAMIC_TYPES, **DYNAMIC_METRICS}.items():
        assert site in used, f"no call site {site} any more"
        assert values(), f"{site} gives no names"


def test_operations_lists_every_log_type_the_code_emits():
    types, _, _ = emitted()
    documented = documented_names("Every Type")
    assert not sorted(types - documented), (
        f"log Types missing from docs/OPERATIONS.md (Every Type): {sorted(types - documented)}"
    )
    assert not sorted(documented - types), (
        "docs/OPERATIONS.md (Every Type) lists Types the code never emits:"
        f" {sorted(documented - types)}"
    )


def test_operations_lists_every_metric_the_code_sends():
    _, metrics, _ = emitted()
    documented = documented_names("4. Metrics")
    assert not sorted(metrics - documented), (
        f"metrics missing from docs/OPERATIONS.md (4. Metrics): {sorted(metrics - documented)}"
    )
    assert not sorted(documented - metrics), (
        "docs/OPERATIONS.md (4. Metrics) lists metrics the code never sends:"
        f" {sorted(documented - metrics)}"
    )


def test_the_collector_reads_every_way_the_code_logs_and_counts():
    """The collector itself, on a module written in each style it must understand."""
    source = """
import logging
from simplepush import logs
from simplepush.logs import event, log

def f(node, metrics, ok, route):
    event(logging.INFO, "a.literal", x=1)
    logs.event(logging.INFO, "a.module_call")
    logs.exception("a.crash")
    event(logging.INFO, "a.yes" if ok else "a.no")
    log.makeRecord("simplepush", 30, "f", 0, "m", (), None, extra={"event_type": "a.manual"})
    logging.getLogger("simplepush").exception("worker.crashed")
    log.info("plain text", extra={"event_type": "a.typed", "fields": {}})
    node.metrics.incr("m.one")
    metrics.timing("m.two", 1.0)
    self._metrics.gauge("m.three", 1)
    self.stats.incr("not.a.metric")
    event(logging.INFO, route.unknown)
    exception("not.from.logs")  # a function of that name not imported from simplepush.logs
"""
    collector = _Collector("example.py")
    collector.visit(ast.parse(source))
    assert collector.types == {
        *("a.literal", "a.module_call", "a.crash", "a.yes", "a.no", "a.manual", "a.typed"),
        "simplepush",
    }
    assert collector.metrics == {"m.one", "m.two", "m.three"}
    assert collector.unread == ["simplepush/example.py:18: Type route.unknown"]
