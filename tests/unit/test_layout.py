"""The package's layout holds: no import loops (lazy imports included), no import from a lower layer into a higher
one, no library module importing the command line, and the packaging lists every package."""

import pytest
import tomllib
from import_graph import cycles, graph
from scripts import ROOT

PACKAGE = ROOT / "hf_multimax"
#: Layers from the bottom up; a module may import its own layer and the ones below. The facade (the package's
#: ``__init__``, which only loads names on demand) sits above them all.
# fmt: off
LAYERS = (
    ("core", ("_version", "extras", "config", "functional", "masking", "modeling", "kernels", "attention",
              "comparators", "loss", "registry", "data", "checkpoint")),
    ("training", ("training",)),
    ("integrations", ("integrations",)),
    ("analysis", ("analysis",)),
    ("hub", ("hub",)),
    ("finetune", ("finetune",)),
    ("compare", ("compare",)),
    ("cli", ("cli",)),
)
# fmt: on
FACADE = {"hf_multimax"}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} is in no layer of tests/unit/test_layout.py: add it where it belongs")


@pytest.fixture(scope="module")
def import_graph():
    return graph(PACKAGE)


def test_no_import_loops(import_graph):
    _, edges = import_graph
    assert cycles(edges) == []


def test_no_import_from_a_lower_layer_into_a_higher_one(import_graph):
    modules, edges = import_graph
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in edges.items()
        if source not in FACADE
        for target in targets
        if target not in FACADE and layer_of(target) > layer_of(source)
    ]
    assert upward == []
    assert all(layer_of(m) is not None for m in modules if m not in FACADE)


def test_library_modules_never_import_the_command_line(import_graph):
    _, edges = import_graph
    offenders = [
        (s, t)
        for s, targets in edges.items()
        for t in targets
        if t.startswith("hf_multimax.cli") and not s.startswith("hf_multimax.cli")
    ]
    assert offenders == []


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found | {"hf_multimax.hub.templates"} == listed


def test_the_command_line_defaults_match_the_library():
    from hf_multimax.analysis import metrics
    from hf_multimax.cli import analyze

    assert (analyze.SPARSITY_THRESHOLD, analyze.MODE_THRESHOLD) == (metrics.SPARSITY_THRESHOLD, metrics.MODE_THRESHOLD)


def test_the_packaged_card_template_is_the_one_in_model_cards():
    from hf_multimax.hub.cards import default_template_path

    assert default_template_path().resolve() == (ROOT / "model_cards" / "multimax_model_card.md").resolve()


def test_every_public_name_is_defined_under_the_name_it_is_exported_by():
    import importlib

    import hf_multimax

    assert set(hf_multimax.__all__) == {"__version__", *hf_multimax._PUBLIC}
    for name, module in hf_multimax._PUBLIC.items():
        assert name in importlib.import_module(module).__all__, f"{module} does not export {name}"
        assert getattr(hf_multimax, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'output_loss'"):
        hf_multimax.output_loss  # noqa: B018 (the old module names of before 0.1.0 are gone)
