"""The public API: one list in ``wsconvert/__init__.py``; every name imports and is documented."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import wsconvert


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse(Path(wsconvert.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    return {alias.asname or alias.name: str(stmt.module) for stmt in block.body
            if isinstance(stmt, ast.ImportFrom) for alias in stmt.names}


def test_lazy_map_and_type_checking_imports_agree() -> None:
    assert _type_checking_imports() == wsconvert._EXPORTS
    assert sorted(wsconvert.__all__) == sorted(["__version__", *wsconvert._EXPORTS])


def test_every_public_name_imports_and_is_documented() -> None:
    for name, module in wsconvert._EXPORTS.items():
        value = getattr(wsconvert, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{module}.{name} has no docstring"
            assert value.__module__ == module, (name, value.__module__)
    for name in ("ProbeSource", "register_adapter", "Adapter", "convert", "fold_and_export",
                 "gate"):
        assert name in wsconvert.__all__
