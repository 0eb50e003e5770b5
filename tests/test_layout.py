"""The package's layering, read from the source: the reference is a leaf, the core is only the op.

* ``reference.py`` imports only the common layer (``config``, ``_inputs``, ``constants``);
* no module of the fast path imports ``reference`` (``backend="reference"`` is looked up by name in
  ``backends.reference()``), only the public namespace (``__init__``) and the tools outside the core do;
* the core does not import the tools (check, demo, bench helpers).
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "mhpo_kernels"
COMMON = {"config", "_inputs", "constants"}


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _imports(path):
    """Package-relative names of the mhpo_kernels modules a file imports (``backends.native``, ...)."""
    rel = path.relative_to(PKG).with_suffix("")
    pkg_parts = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("mhpo_kernels"):
                mod = node.module[len("mhpo_kernels."):] if node.module != "mhpo_kernels" else ""
            else:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" if mod else a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("mhpo_kernels."):] for a in node.names if a.name.startswith("mhpo_kernels.")}
    return found


def _name(path):
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


def test_reference_is_a_leaf():
    imported = {m.split(".")[0] for m in _imports(PKG / "reference.py") if m}
    assert imported <= COMMON, f"reference.py imports {sorted(imported - COMMON)} beyond the common layer"


# the fast path: every module but the public namespace, the reference itself and the tools
FAST = [p for p in _modules() if _name(p) not in ("__init__", "reference") and not _name(p).startswith("tools.")]


@pytest.mark.parametrize("module_file", FAST, ids=_name)
def test_fast_path_never_imports_reference(module_file):
    assert "reference" not in _imports(module_file), f"{_name(module_file)} imports the reference"


@pytest.mark.parametrize("module_file", [p for p in FAST if _name(p) != "__main__"], ids=_name)  # the CLI runs the tools
def test_core_does_not_import_the_tools(module_file):
    tools = [m for m in _imports(module_file) if m == "tools" or m.startswith("tools.")]
    assert not tools, f"{_name(module_file)} imports {tools}"


def test_the_checker_sees_imports():
    """The import reader finds a relative import of the reference (so the tests above can fail)."""
    assert "reference" in _imports(PKG / "__init__.py")
    assert "backends.native" in _imports(PKG / "backends" / "__init__.py")
