"""Dependencies point down: the layers below never import the layers above, not even inside a function.

The graph is read from the source with ``ast`` (nothing is imported), so the check costs milliseconds.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hemorrhage_hf"

#: (importing package, imported package): edges that would point up.
FORBIDDEN = [
    ("modify", "measurement"),
    ("modify", "comparison"),
    ("modify", "integrations"),
    ("measurement", "modify"),
    *((low, high) for low in ("modify", "measurement", "corpus", "models") for high in ("commands", "cli", "space")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every hemorrhage_hf module ``path`` imports, at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import engine`
    return {name for name in found if name.split(".")[0] == "hemorrhage_hf"}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def upward_edges() -> list[str]:
    """``"source → package"`` for each module that imports a package above it."""
    edges = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target in imported_modules(path):
            if (_top(source), _top(target)) in FORBIDDEN:
                edges.add(f"{source} → hemorrhage_hf.{_top(target)}")
    return sorted(edges)


def test_the_import_graph_has_no_upward_edge():
    assert upward_edges() == []


def test_the_graph_reader_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    """The check itself can fail: a deferred relative import from modify into measurement is caught."""
    fake = tmp_path / "hemorrhage_hf"
    (fake / "modify").mkdir(parents=True)
    (fake / "modify" / "bad.py").write_text("def f():\n    from ..measurement.engine import measure\n")
    (fake / "modify" / "fine.py").write_text("from . import base\nfrom ..errors import SpecError\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert imported_modules(fake / "modify" / "bad.py") == {
        "hemorrhage_hf.measurement.engine",
        "hemorrhage_hf.measurement.engine.measure",
    }
    assert upward_edges() == ["hemorrhage_hf.modify.bad → hemorrhage_hf.measurement"]


def test_modify_exports_of_the_top_level_bring_the_checkpoint_hook():
    """``hemorrhage_hf.apply_modification`` registers the integration's hook, so a w8a8 checkpoint reloads whole."""
    import subprocess
    import sys

    script = (
        "import hemorrhage_hf as hh; hh.apply_modification; "
        "from hemorrhage_hf.modify import base; "
        "print([hook.__name__ for hook in base._RUNTIME_STATE_HOOKS])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['attach_quantization_config']"
