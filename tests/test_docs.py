"""Docs that stay true: every dotted name they mention resolves, and their examples run.

The names are read where a user or a contributor reads them: README.md, docs/*.md and the package's
own source (docstrings and comments), in two spellings: ``lightning_idrs.module.name`` anywhere, and
``module.name`` (a module of the package) between backticks or in a Sphinx role.
"""
import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lightning_idrs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_idrs"
MODULES = sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE)], "lightning_idrs."))
SHORT = sorted({name.split(".")[1] for name in MODULES} - {"__main__"})
FULL_NAME = re.compile(r"lightning_idrs(?:\.[A-Za-z_]\w*)+")
SHORT_NAME = re.compile(r"(?:`|:(?:func|class|mod|meth|attr):`~?)(?<!-)((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(SHORT))


def documents():
    yield from [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(PACKAGE.rglob("*.py"))]


FILE_SUFFIXES = (".py", ".yaml", ".json", ".md", ".tsv", ".png", ".txt")  # `knn.py` names a file, not a name


def mentioned_names():
    found = {}
    for path in documents():
        text = path.read_text(encoding="utf-8")
        for match in FULL_NAME.finditer(text):
            found.setdefault(match.group(0).rstrip("."), path.relative_to(REPO))
        for match in SHORT_NAME.finditer(text):
            found.setdefault("lightning_idrs." + match.group(1).rstrip("."), path.relative_to(REPO))
    return {name: where for name, where in found.items() if not name.endswith(FILE_SUFFIXES)}


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_the_scan_finds_names_in_every_kind_of_document():
    sources = {str(path).split("/")[0] for path in mentioned_names().values()}
    assert {"README.md", "docs", "lightning_idrs"} <= sources


def test_every_dotted_name_in_the_docs_resolves():
    broken = {name: str(where) for name, where in mentioned_names().items() if not resolves(name)}
    assert not broken, f"names that no longer exist (name: first file that mentions it): {broken}"


def test_a_stale_name_would_be_caught():
    assert resolves("lightning_idrs.radius.certified_radius")
    assert not resolves("lightning_idrs.smoothing.certify_chunks_that_moved")
    assert not resolves("lightning_idrs.no_such_module.thing")


@pytest.mark.parametrize("module", MODULES)
def test_examples_in_docstrings_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", ["certified_radius", "sigma_ratio_bounds", "KnnSigma", "SmoothedClassifier"])
def test_the_main_public_api_has_runnable_examples(name):
    examples = doctest.DocTestFinder().find(getattr(lightning_idrs, name), name)
    assert sum(len(test.examples) for test in examples) >= 2, f"{name} has no runnable example"


def python_blocks(path: Path):
    """The ```python blocks of a Markdown file, dedented (README's sit inside a list item)."""
    import textwrap

    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)]


@pytest.mark.parametrize("document", ["README.md", "docs/extending.md"])
def test_the_user_sigma_examples_run_and_keep_their_promise(document):
    """Each Sigma subclass the docs show is defined, returns a positive float per input, and is as
    semi-elastic as it declares on random pairs of inputs."""
    import torch

    namespace = {"torch": torch, "lightning_idrs": lightning_idrs}
    for block in python_blocks(REPO / document):
        if re.search(r"^class \w+\((lightning_idrs\.)?Sigma\)", block, re.M):  # the blocks that define a sigma
            exec(compile(block, document, "exec"), namespace)
    sigmas = [value for value in namespace.values()
              if isinstance(value, type) and issubclass(value, lightning_idrs.Sigma) and value is not lightning_idrs.Sigma]
    assert sigmas, f"{document} shows no Sigma subclass"
    x, y = torch.rand(2, 64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    for cls in sigmas:
        sigma = cls()
        sx, sy = sigma(x), sigma(y)
        assert sx.shape == (64,) and sx.is_floating_point() and bool((sx > 0).all())
        gap = (sx.double().log() - sy.double().log()).abs()
        assert bool((gap <= sigma.semi_elasticity * (x - y).flatten(1).norm(dim=1).double() + 1e-6).all())
