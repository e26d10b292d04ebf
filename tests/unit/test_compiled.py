"""The compiled request path (gateway/compiled.py): its module list, the rule its code
keeps for mypyc, and the guard against a stale build."""

from __future__ import annotations

import ast
import importlib.machinery
from pathlib import Path

import pytest

from gateway import compiled

REPO = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _awaits_in_handlers(source: str) -> list[int]:
    """Lines of awaits (and async with/for) inside except or finally blocks."""
    found = []
    for node in ast.walk(ast.parse(source)):
        blocks: list[ast.stmt] = []
        if isinstance(node, ast.ExceptHandler):
            blocks = node.body
        elif isinstance(node, ast.Try | ast.TryStar):
            blocks = node.finalbody
        for statement in blocks:
            for inner in ast.walk(statement):
                if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor):
                    found.append(inner.lineno)
    return found


def _built_tree(root: Path) -> None:
    """A tree of every listed module, each with a compiled file and a manifest."""
    for module in compiled.MODULES:
        source = root / (module.replace(".", "/") + ".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
        source.with_name(source.stem + SUFFIX).write_bytes(b"")
    compiled.write_manifest(root)


def test_every_listed_module_has_a_source() -> None:
    """setup.py compiles files that exist, one per listed module."""
    files = compiled.source_files()
    assert len(files) == len(set(files)) == len(compiled.MODULES)
    assert all((REPO / path).is_file() for path in files)


def test_no_compiled_module_awaits_inside_except_or_finally() -> None:
    """mypyc mishandles an await in a handler: no compiled module has one."""
    offenders = {
        path: lines
        for path in compiled.source_files()
        if (lines := _awaits_in_handlers((REPO / path).read_text()))
    }
    assert offenders == {}


def test_the_await_check_finds_awaits_in_handlers() -> None:
    """The check above does see an await in except, in finally, and an async with."""
    source = """
async def f():
    try:
        pass
    except Exception:
        await g()
    try:
        pass
    finally:
        async with h():
            pass
    await g()
"""
    assert sorted(_awaits_in_handlers(source)) == [6, 10]


def test_a_source_changed_since_its_build_is_stale(tmp_path: Path) -> None:
    """An edited source behind a compiled module is named; the others are not."""
    _built_tree(tmp_path)
    assert compiled.stale_modules(tmp_path) == []
    edited = compiled.MODULES[3]
    (tmp_path / compiled.source_files()[3]).write_text("NAME = 'edited'\n")
    assert compiled.stale_modules(tmp_path) == [edited]


def test_a_build_with_no_record_is_stale_and_a_pure_tree_is_not(tmp_path: Path) -> None:
    """Compiled files without a manifest are suspect; sources alone are fine."""
    _built_tree(tmp_path)
    (tmp_path / "gateway" / compiled.MANIFEST).unlink()
    assert compiled.stale_modules(tmp_path) == list(compiled.MODULES)
    for module in compiled.MODULES:
        for path in compiled.compiled_files(module, tmp_path):
            path.unlink()
    assert compiled.stale_modules(tmp_path) == []


def test_the_stale_build_error_names_the_modules_and_the_fix() -> None:
    """refuse_stale_build's message says which module and how to get out."""
    with pytest.raises(compiled.StaleBuildError) as raised:
        compiled.raise_if_stale(["gateway.proxy.front"])
    message = str(raised.value)
    assert "gateway.proxy.front" in message
    assert "pip install -e ." in message and "scripts/pure" in message
