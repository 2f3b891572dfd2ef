"""Every docstring example in molf_jax runs and prints what it says (examples marked
``# doctest: +SKIP`` need a model, a GPU or several processes and are only read)."""

import doctest
import importlib
import pkgutil

import pytest

import molf_jax

# `python -m molf_jax.cli` runs the CLI on import.
_NOT_IMPORTED = ("molf_jax.cli.__main__",)


def library_modules() -> list[str]:
    names = [molf_jax.__name__]
    for info in pkgutil.walk_packages(molf_jax.__path__, prefix="molf_jax."):
        if info.name not in _NOT_IMPORTED:
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", library_modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        # Only the module's own docstrings: re-exported objects are tested where defined.
        if test.filename and module.__file__ and test.filename != module.__file__:
            continue
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_are_found():
    # A finder that saw nothing would pass every module above.
    module = importlib.import_module("molf_jax.train.plan")
    tests = doctest.DocTestFinder().find(module, module.__name__)
    assert sum(len(t.examples) for t in tests) >= 4
