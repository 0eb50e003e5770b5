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


# the CLI (__main__) runs the tools
@pytest.mark.parametrize("module_file", [p for p in FAST if _name(p) != "__main__"], ids=_name)
def test_core_does_not_import_the_tools(module_file):
    tools = [m for m in _imports(module_file) if m == "tools" or m.startswith("tools.")]
    assert not tools, f"{_name(module_file)} imports {tools}"


def test_the_checker_sees_imports():
    """The import reader finds a relative import of the reference (so the tests above can fail)."""
    assert "reference" in _imports(PKG / "__init__.py")
    assert "backends.native" in _imports(PKG / "backends" / "__init__.py")


# ----------------------------------------------------------------------------- the Triton kernels' name

ROOT = PKG.parent
OLD_NAME = "triton_kernels"  # the source folder; installed as mhpo_kernels.triton_kernels (setup.py)


def _top_level_imports(path):
    """``file:line name`` of each absolute import of the top-level ``triton_kernels`` in a file
    (``import triton_kernels[.x]``, ``from triton_kernels[.x] import ...``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == OLD_NAME]
    return found


def test_nothing_imports_the_top_level_triton_kernels(tmp_path):
    """``triton_kernels`` is triton-lang's kernel library: ours installs as ``mhpo_kernels.triton_kernels``,
    and in a checkout the folder of that name (the cwd is on sys.path) must not be imported either."""
    files = [p for d in ("mhpo_kernels", "triton_kernels", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    files += list(ROOT.glob("*.py"))
    assert len(files) > 20
    bad = [hit for p in files for hit in _top_level_imports(p)]
    assert not bad, bad
    # the reader sees such imports (and not the relative one, nor the new name)
    probe = tmp_path / "probe.py"
    probe.write_text("import triton_kernels.aot\nfrom triton_kernels import fwd\nfrom . import triton_kernels\n"
                     "import mhpo_kernels.triton_kernels\nfrom mhpo_kernels import triton_kernels\n")
    assert [h.split()[1] for h in _top_level_imports(probe)] == ["triton_kernels.aot", "triton_kernels"]


def test_triton_backend_does_not_import_the_top_level_name():
    """Loading the triton backend imports ``mhpo_kernels.triton_kernels`` and leaves ``triton_kernels``
    to whatever the user installed under that name."""
    pytest.importorskip("triton")
    import sys

    from mhpo_kernels import backends

    mod = backends.get("triton")
    assert mod.__name__ == "mhpo_kernels.triton_kernels"
    assert sys.modules["mhpo_kernels.triton_kernels"] is mod
    assert OLD_NAME not in sys.modules, sys.modules[OLD_NAME]
