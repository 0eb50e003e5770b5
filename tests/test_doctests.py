"""The examples in the package's docstrings run (CPU tensors, tiny shapes) and print what they show."""
import doctest
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mhpo_kernels"
# every module of the package whose source holds an example (found without importing it)
MODULES = sorted(
    ".".join(("mhpo_kernels",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text()
)


def test_the_public_api_has_examples():
    assert {"mhpo_kernels.api", "mhpo_kernels.fused_linear"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module}: no example ran"
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed (output above)"
