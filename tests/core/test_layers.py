"""The package's layers hold: imports run only downwards, no detector imports another, imports sit at
module top (except the few with a stated start-up reason), and a detector is registered by its decorator
alone.

Layers, bottom to top (docs/architecture.md)::

    core  <-  data  <-  models  <-  features  <-  detectors  <-  audit  <-  train  <-  api  <-  cli
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

import labelsieve
from labelsieve.detectors import DetectionContext, DetectionResult, Detector, list_detectors, register_detector
from labelsieve.detectors import registry as registry_module

PACKAGE = Path(labelsieve.__file__).parent
LAYERS = ["core", "data", "models", "features", "detectors", "audit", "train", "api", "cli"]
#: Modules placed by name rather than by folder.
MODULE_LAYER = {"labelsieve.testing": "data", "labelsieve.api": "api", "labelsieve.cli": "cli",
                "labelsieve.__main__": "cli", "labelsieve.demo": "cli", "labelsieve": "core"}
#: Imports inside functions (of any module, labelsieve's or not), each with its reason in docs/architecture.md,
#: "Start-up": the API's and the demo's seconds of torch/open_clip; fcntl exists on POSIX only; scipy.stats
#: serves one noise kind; the optional extras (fiftyone, label-studio-sdk) may be absent and are slow to import.
LAZY_ALLOWED = {("labelsieve.cli", "_api"), ("labelsieve.cli", "demo"), ("labelsieve.data.imagecache", "_file_lock"),
                ("labelsieve.data.noise", "instance_noise"), ("labelsieve.audit.handoff.fiftyone", "_fiftyone"),
                ("labelsieve.audit.handoff.labelstudio", "_label_interface")}
#: Optional extras: imported only inside the functions of LAZY_ALLOWED, never at a module's top.
OPTIONAL = ("fiftyone", "label_studio_sdk", "selenium")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    if module == "labelsieve":
        return MODULE_LAYER[module]
    for prefix, layer in MODULE_LAYER.items():
        if prefix != "labelsieve" and (module == prefix or module.startswith(prefix + ".")):
            return layer
    return module.split(".")[1]


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, str | None, bool]]:
    """(imported labelsieve module, enclosing function name, under TYPE_CHECKING) for every import."""
    out: list[tuple[str, str | None, bool]] = []

    def visit(node: ast.AST, func: str | None, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            t = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("labelsieve"):
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    out.append((full if _is_module(full) else child.module, f, t))
            elif isinstance(child, ast.Import):
                out.extend((a.name, f, t) for a in child.names if a.name.startswith("labelsieve"))
            visit(child, f, t)

    visit(tree, None, False)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


MODULES = _modules()


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} <= set(LAYERS)


def test_imports_only_run_downwards():
    bad = []
    for name, tree in MODULES.items():
        for target, _, _ in _imports(tree):
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(name)):
                bad.append(f"{name} ({_layer(name)}) imports {target} ({_layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_detector_imports_another_and_common_imports_none():
    detector_modules = {m for m in MODULES if m.startswith("labelsieve.detectors.")
                        and m.split(".")[2] not in ("common", "registry")}
    assert len(detector_modules) == len(list_detectors()) == 9
    bad = []
    for name, tree in MODULES.items():
        if name in detector_modules or name.startswith("labelsieve.detectors.common"):
            bad += [f"{name} imports {t}" for t, _, _ in _imports(tree) if t in detector_modules and t != name]
    assert not bad, "\n".join(bad)


def _all_imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function name) for every import, labelsieve's or not."""
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.append((child.module, f))
            elif isinstance(child, ast.Import):
                out.extend((a.name, f) for a in child.names)
            visit(child, f)

    visit(tree, None)
    return out


def test_imports_at_module_top_unless_a_start_up_reason_is_stated():
    inner = sorted({(name, func) for name, tree in MODULES.items() for _, func, typing_only in _imports(tree)
                    if func is not None and not typing_only}
                   | {(name, func) for name, tree in MODULES.items() for _, func in _all_imports(tree)
                      if func is not None})
    assert set(inner) <= LAZY_ALLOWED, inner


def test_optional_extras_are_imported_only_where_needed():
    """fiftyone and label-studio-sdk are extras: importing labelsieve (any module) never imports them."""
    bad = [f"{name} imports {mod} at module top" for name, tree in MODULES.items()
           for mod, func in _all_imports(tree) if func is None and mod.split(".")[0] in OPTIONAL]
    assert not bad, bad


def test_a_detector_is_registered_by_its_decorator_alone(tmp_path, monkeypatch):
    """Adding a detector is one file: the registry finds it by importing the package's modules
    (docs/architecture.md, "Add a detector"). The file goes to a folder added to the package's path, so the
    test leaves the source tree alone."""
    source = '''
import numpy as np
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.registry import register_detector


@register_detector
class ZeroShotPlusOneDetector(Detector):
    name = "recipe_test_detector"
    summary = "test-only: p_clean = 0.25 for class 0, else 0.75"

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        p = np.where(ctx.labels == 0, 0.25, 0.75)
        probs = np.full((len(p), ctx.n_classes), 1.0 / ctx.n_classes)
        return DetectionResult(p_clean=p, probs=probs, rule="test")
'''
    (tmp_path / "recipe_test_detector.py").write_text(source)
    package = sys.modules["labelsieve.detectors"]
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        monkeypatch.setattr(registry_module, "_discovered", False)
        assert "recipe_test_detector" in list_detectors()
        det = labelsieve.create_detector("recipe_test_detector")
        ctx = DetectionContext(labels=np.array([0, 1]), classnames=["a", "b"], images=None, encoder=None,
                               features_fn=lambda: None, device=None)
        assert det.detect(ctx).is_noisy.tolist() == [True, False]
    finally:
        registry_module._REGISTRY.pop("recipe_test_detector", None)
        sys.modules.pop("labelsieve.detectors.recipe_test_detector", None)


def test_the_decorator_checks_the_class_and_refuses_a_taken_name():
    with pytest.raises(TypeError, match="Detector subclasses"):
        register_detector(int)  # type: ignore[arg-type]

    class NoName(Detector):
        summary = "x"

        def detect(self, ctx: DetectionContext) -> DetectionResult:  # pragma: no cover
            raise NotImplementedError

    with pytest.raises(TypeError, match="lowercase identifier"):
        register_detector(NoName)

    class Knn2(NoName):
        name = "knn"

    with pytest.raises(TypeError, match="'knn' is taken"):
        register_detector(Knn2)
