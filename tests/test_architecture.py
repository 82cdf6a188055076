"""The code shows its architecture: layers in the folder tree, imports pointing one way, a start-up that costs nothing.

The layers and their order are `[tool.importlinter]` in pyproject.toml (checked here with import-linter); imports
inside functions count, as grimp reads every import statement of a module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import hf_lorsa

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["base", "kernels", "host", "model", "inputs", "formats", "evaluation", "training", "analysis"]


def cycles(graph) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): every import circle of the package."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("hf_lorsa", exclude_type_checking_imports=True)
    assert len(graph.modules) > 50
    # imports inside functions are in the graph: a lazy command import of the command line
    assert graph.direct_import_exists(importer="hf_lorsa.training.run_training", imported="hf_lorsa.model.replica")
    assert cycles(graph) == []


def test_a_circle_would_be_found(tmp_path, monkeypatch):
    package = tmp_path / "circle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")  # inside a function: still an import
    (package / "b.py").write_text("from .a import f\n\ng = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles(grimp.build_graph("circle")) == [["circle.a", "circle.b"]]


def test_each_layer_imports_only_those_below_it():
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_folder_tree_is_the_layers():
    package = Path(hf_lorsa.__file__).parent
    folders = sorted(p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == sorted([*LAYERS, "embedded"])
    loose = sorted(p.stem for p in package.glob("*.py"))
    assert loose == ["__init__", "__main__", "cli", "quickstart"]  # the command line sits on top


def test_importing_the_package_loads_neither_torch_nor_transformers():
    code = "import sys, hf_lorsa; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", hf_lorsa.__all__)
def test_every_public_name_imports(name):
    assert getattr(hf_lorsa, name) is not None
    assert name in dir(hf_lorsa)


def test_the_lorsa_classes_register_with_the_auto_classes_when_they_load():
    code = (
        "from transformers import AutoConfig, AutoModel\n"
        "from hf_lorsa import LorsaConfig, LorsaModel\n"
        "config = AutoConfig.for_model('lorsa', d_model=8, n_qk_heads=2, d_qk_head=4, n_ov_heads=4, top_k=2)\n"
        "print(type(config).__name__, type(AutoModel.from_config(config)).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["LorsaConfig", "LorsaModel"]
