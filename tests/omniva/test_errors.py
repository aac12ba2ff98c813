"""Every failure code the platform writes is a named FailureCode, and documented.

The scan reads the source of the modules that write a job's, stage run's or event's
`error` (the worker, the orchestrator's services, the event queue, the engine runner)
and collects every quoted code in a code's place, so a code added as a bare literal,
and not in the enum, fails here rather than reaching clients unnamed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from omniva.errors import FailureCode

ROOT = Path(__file__).resolve().parents[2]

PLATFORM_MODULES = [
    "jobs/services/*.py",
    "jobs/worker.py",
    "jobs/broker.py",
    "jobs/tasks.py",
    "jobs/gpu_worker.py",
    "jobs/selectors.py",
    "jobs/api/*.py",
    "jobs/grpc/*.py",
    "engines/services/*.py",
    "engines/selectors.py",
    "engines/api/*.py",
    # The engine SDK's runner reports events failed with codes of its own; wherever the
    # SDK lives (engines/ or engines/sdk/).
    "engines/**/runner.py",
    "engines/**/handlers.py",
]

CODE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
# A code inside SQL text: jsonb_build_object('code', 'X') or a JSON literal {"code": "X"}.
SQL_CODE = re.compile(r"""['"]code['"]\s*[,:]\s*['"]([A-Z][A-Z0-9_]*)['"]""")
# Calls whose positional argument at this index is a failure code.
CODE_ARGUMENT = {"StageError": 0, "_report_failure": 1}


def _is_code_name(name: str) -> bool:
    return name == "code" or name.endswith("_code")


def _literals(node: ast.AST | None) -> list[str]:
    """The quoted codes `node` may evaluate to (through `or` and `a if c else b`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if CODE.match(node.value) else []
    if isinstance(node, ast.BoolOp):
        return [code for value in node.values for code in _literals(value)]
    if isinstance(node, ast.IfExp):
        return _literals(node.body) + _literals(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str":
        return [code for arg in node.args for code in _literals(arg)]
    return []


def _call_name(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return ""


def written_codes(source: str) -> set[str]:
    """The literal codes `source` puts where a failure's code goes."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "code":
                    found.update(_literals(value))
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg and _is_code_name(keyword.arg):
                    found.update(_literals(keyword.value))
            index = CODE_ARGUMENT.get(_call_name(node))
            if index is not None and len(node.args) > index:
                found.update(_literals(node.args[index]))
        elif isinstance(node, ast.arguments):
            positional = node.posonlyargs + node.args
            for arg, default in zip(positional[::-1], node.defaults[::-1], strict=False):
                if _is_code_name(arg.arg):
                    found.update(_literals(default))
            for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True):
                if _is_code_name(arg.arg):
                    found.update(_literals(default))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (
                    (isinstance(target, ast.Name) and _is_code_name(target.id))
                    or (isinstance(target, ast.Attribute) and _is_code_name(target.attr))
                    or (
                        isinstance(target, ast.Subscript)
                        and isinstance(target.slice, ast.Constant)
                        and target.slice.value == "code"
                    )
                ):
                    found.update(_literals(node.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(SQL_CODE.findall(node.value))
    return found


def named_codes(source: str) -> set[str]:
    """The FailureCode members `source` refers to."""
    return {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "FailureCode"
    }


def _platform_sources() -> dict[str, str]:
    paths = {path for pattern in PLATFORM_MODULES for path in ROOT.glob(pattern)}
    return {str(path.relative_to(ROOT)): path.read_text() for path in sorted(paths)}


def test_the_scan_finds_a_code_in_every_place_one_is_written() -> None:
    source = """
error = {"code": "IN_A_DICT", "message": "m"}
stage_fail(stage_run_id=1, token="t", code="AS_A_KEYWORD", message="m")
raise StageError("RAISED", "m", retryable=False)
_report_failure(claim, "REPORTED", "m", retryable=True)
code = str(error.get("code") or "A_FALLBACK")
def fail(message, default_code="A_DEFAULT", *, code="A_KEYWORD_DEFAULT"): ...
event.error["code"] = "SUBSCRIPTED"
SQL = "UPDATE e SET error = jsonb_build_object('code', 'IN_SQL', 'message', %s)"
log("not a code", "NOT_IN_A_CODE_PLACE")
"""
    assert written_codes(source) == {
        "IN_A_DICT",
        "AS_A_KEYWORD",
        "RAISED",
        "REPORTED",
        "A_FALLBACK",
        "A_DEFAULT",
        "A_KEYWORD_DEFAULT",
        "SUBSCRIPTED",
        "IN_SQL",
    }


def test_every_code_the_platform_writes_is_a_failure_code() -> None:
    sources = _platform_sources()
    assert "jobs/worker.py" in sources
    assert "engines/services/deadletter.py" in sources
    assert any(path.endswith("runner.py") for path in sources), "the engine runner moved"

    unnamed = {
        path: sorted(codes)
        for path, source in sources.items()
        if (codes := written_codes(source) - set(FailureCode))
    }

    assert unnamed == {}, "add these to omniva.errors.FailureCode (and the docs' table)"


def test_every_failure_code_is_written_somewhere() -> None:
    written: set[str] = set()
    for source in _platform_sources().values():
        written |= written_codes(source) | named_codes(source)

    assert set(FailureCode) - written == set()


def test_every_failure_code_is_in_the_docs_table() -> None:
    docs = (ROOT / "docs/jobs.md").read_text() + (ROOT / "docs/engines.md").read_text()
    tabled = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", docs, re.MULTILINE))

    assert set(FailureCode) - tabled == set()


def test_failure_codes_are_their_names() -> None:
    # Clients read the value; a member renamed apart from its value would be a new code.
    assert all(member.value == member.name for member in FailureCode)
