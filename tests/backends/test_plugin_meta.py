"""Meta-tests that keep the plugin contract honest: every hook is documented and tested,
and every registered backend runs the conformance kits that apply to it."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

from torchstow.errors import UnknownBackendError
from torchstow.plugins import hookspecs
from torchstow.plugins.manager import default_registry
from torchstow.spi import Backend, StoreBackend
from torchstow.testing import BackendConformance, ByteStoreConformance, DistributedBackendConformance

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _hooks() -> list[object]:
    return [
        fn for _, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "torchstow_spec")
    ]


def test_there_are_hooks() -> None:
    assert [h.__name__ for h in _hooks()] == ["torchstow_register_backends"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("hook", _hooks(), ids=lambda h: h.__name__)
def test_every_hook_is_documented(hook: object) -> None:
    name = hook.__name__  # type: ignore[attr-defined]
    assert name.startswith("torchstow_")
    assert (inspect.getdoc(hook) or "").strip(), f"{name} has no docstring"
    signature = inspect.signature(hook)  # type: ignore[arg-type]
    assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
    assert signature.return_annotation is not inspect.Signature.empty
    tutorial = (ROOT / "docs" / "plugins.md").read_text()
    params = ", ".join(f"{p}: {signature.parameters[p].annotation}" for p in signature.parameters)
    assert f"`{name}({params}) -> {signature.return_annotation}`" in tutorial, (
        f"{name} is not in docs/plugins.md"
    )


@pytest.mark.parametrize("hook", _hooks(), ids=lambda h: h.__name__)
def test_every_hook_is_tested(hook: object) -> None:
    name = hook.__name__  # type: ignore[attr-defined]
    users = [
        p.name
        for p in TESTS.rglob("test_*.py")
        if p.name != Path(__file__).name and f"def {name}(" in p.read_text()
    ]
    assert users, f"no test implements the hook {name}"


def _kit_classes(kit: type) -> list[type]:
    """Every subclass of a conformance kit that the test modules define (modules that
    mention a kit are imported, as pytest would import them, if pytest has not yet)."""
    for path in sorted(TESTS.rglob("test_*.py")):
        if path.stem in sys.modules or "Conformance" not in path.read_text():
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    found: list[type] = []
    pending = list(kit.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


# Each kit and the registered backends it must cover: every backend runs the end-to-end
# and the multi-process kits (none of ours keeps its data inside one process); every
# byte-store backend runs the byte-store kit.
KITS = {
    "end to end": (BackendConformance, Backend),
    "byte store": (ByteStoreConformance, StoreBackend),
    "multi-process": (DistributedBackendConformance, Backend),
}


@pytest.mark.parametrize("kit", KITS)
def test_every_registered_backend_runs_the_conformance_kits(kit: str) -> None:
    base, applies_to = KITS[kit]
    registry = default_registry()
    covered = {}
    for cls in _kit_classes(base):
        # Wrapper schemes (faulty+file) resolve to the wrapper's backend; classes of
        # plugins installed only for one test (the example plugin) resolve to nothing.
        with contextlib.suppress(UnknownBackendError):
            covered[registry.resolve(f"{cls.scheme}://x").backend] = cls.__name__
    missing = {
        entry.backend.__name__: entry.scheme
        for entry in registry.available()
        if issubclass(entry.backend, applies_to) and entry.backend not in covered
    }
    assert not missing, f"backends without a {kit} conformance test class (scheme): {missing}"
