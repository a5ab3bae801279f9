"""The plugin system: entry-point discovery, scheme conflicts, disabling, unknown schemes,
broken plugins. Plugins here are real distributions (dist-info directories on sys.path),
found by importlib.metadata exactly as installed ones are."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest
import torch

import torchstow
import torchstow.spi
from torchstow import PluginConflictError, UnknownBackendError
from torchstow.backends.filesystem import FileSystemBackend
from torchstow.backends.fsspec import FsspecBackend
from torchstow.cli import main
from torchstow.plugins.manager import DISABLE_ENV, BackendRegistry, PluginManager, get_plugin_manager

_PLUGIN = """
from torchstow.spi import hookimpl
from torchstow.backends.filesystem import FileSystemBackend

class {cls}(FileSystemBackend):
    schemes = {schemes!r}

    def open_store(self, uri):
        return super().open_store(uri.split("://", 1)[1])

@hookimpl
def torchstow_register_backends(register):
    register({cls}, preferred={preferred})
"""

# A plugin whose registration hook raises (a misconfigured one).
_RAISING_PLUGIN = """
from torchstow.spi import hookimpl

@hookimpl
def torchstow_register_backends(register):
    raise RuntimeError("misconfigured")
"""


class Plugins:
    """Writes plugin distributions into a directory on sys.path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, dist: str, name: str, source: str, version: str = "1.0") -> None:
        module = f"{name}_plugin_module"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[torchstow.backends]\n{name} = {module}\n")
        importlib.invalidate_caches()

    def add_backend(
        self, dist: str, name: str, cls: str, schemes: tuple[str, ...], preferred: bool = False
    ) -> None:
        self.add(dist, name, _PLUGIN.format(cls=cls, schemes=schemes, preferred=preferred))


@pytest.fixture
def plugins(tmp_path: Path, fresh_registry: None) -> Iterator[Plugins]:
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield Plugins(root)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.endswith("_plugin_module")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_builtins_are_entry_point_plugins_with_versions() -> None:
    pm = get_plugin_manager()
    assert {"filesystem", "fsspec", "shm"} <= set(pm.versions)
    assert pm.distributions["fsspec"] == "torchstow"
    entries = {e.scheme: e for e in BackendRegistry(pm).available()}
    assert entries["s3"].plugin == "fsspec"
    assert entries["s3"].backend is FsspecBackend
    assert entries["s3"].version == torchstow.__version__
    assert entries["file"].backend is FileSystemBackend
    assert entries["shm"].distribution == "torchstow"


def test_a_plugin_is_discovered_and_serves_its_scheme(plugins: Plugins, tmp_path: Path) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("alpha",))
    entry = next(e for e in torchstow.spi.available_backends() if e.scheme == "alpha")
    assert (entry.plugin, entry.distribution, entry.version) == ("alpha", "alpha-store", "1.0")
    uri = f"alpha://{tmp_path}/ckpt"
    torchstow.save({"w": torch.arange(4)}, uri)
    assert torch.equal(torchstow.read(uri)["w"], torch.arange(4))


def test_two_plugins_claiming_a_scheme_is_an_error_naming_both(plugins: Plugins) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("dup", "alpha"))
    plugins.add_backend("beta-store", "beta", "BetaBackend", ("dup",))
    with pytest.raises(PluginConflictError) as caught:
        BackendRegistry(get_plugin_manager())
    message = str(caught.value)
    assert "'dup'" in message
    assert "plugin 'alpha' (AlphaBackend)" in message
    assert "plugin 'beta' (BetaBackend)" in message
    assert f"{DISABLE_ENV}=" in message
    assert "preferred=True" in message


def test_a_preferred_plugin_wins_a_scheme(plugins: Plugins) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("dup",))
    plugins.add_backend("beta-store", "beta", "BetaBackend", ("dup",), preferred=True)
    entry = BackendRegistry(get_plugin_manager()).resolve("dup://x")
    assert (entry.plugin, entry.backend.__name__, entry.preferred) == ("beta", "BetaBackend", True)


def test_a_preferred_plugin_replaces_a_builtin(plugins: Plugins) -> None:
    plugins.add_backend("my-s3", "mys3", "MyS3Backend", ("s3",), preferred=True)
    registry = BackendRegistry(get_plugin_manager())
    assert registry.resolve("s3://bucket/x").backend.__name__ == "MyS3Backend"
    assert registry.resolve("gs://bucket/x").backend is FsspecBackend  # the rest stays


def test_two_preferred_plugins_still_conflict(plugins: Plugins) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("dup",), preferred=True)
    plugins.add_backend("beta-store", "beta", "BetaBackend", ("dup",), preferred=True)
    with pytest.raises(PluginConflictError, match=r"'alpha'.*'beta'|'beta'.*'alpha'"):
        BackendRegistry(get_plugin_manager())


def test_disabling_resolves_a_conflict_and_blocks_plugins(
    plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("dup",))
    plugins.add_backend("beta-store", "beta", "BetaBackend", ("dup",))
    monkeypatch.setenv(DISABLE_ENV, " beta , shm")
    registry = BackendRegistry(get_plugin_manager())
    assert registry.resolve("dup://x").plugin == "alpha"
    with pytest.raises(UnknownBackendError, match=f"Blocked by {DISABLE_ENV}: beta, shm"):
        registry.resolve("shm://run/step-1")
    assert "beta" not in registry.pm.versions


def test_disabling_a_builtin_through_the_public_api(
    fresh_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DISABLE_ENV, "fsspec")
    with pytest.raises(UnknownBackendError, match=r"'s3://bucket/ckpt'.*scheme 's3'"):
        torchstow.save({}, "s3://bucket/ckpt")
    assert {e.scheme for e in torchstow.spi.available_backends()} == {"faulty", "file", "shm"}


def test_unknown_scheme_quotes_the_uri_and_lists_the_installed_schemes() -> None:
    with pytest.raises(UnknownBackendError) as caught:
        torchstow.load({}, "nosuch://bucket/step-1")
    message = str(caught.value)
    assert "'nosuch://bucket/step-1'" in message
    assert "scheme 'nosuch'" in message
    assert "installed schemes: " in message
    assert all(s in message for s in ("file", "memory", "s3", "shm"))
    assert isinstance(caught.value, ValueError)


def test_a_broken_plugin_does_not_take_the_others_down(plugins: Plugins, tmp_path: Path) -> None:
    plugins.add("broken-store", "broken", "import a_module_that_does_not_exist\n")
    plugins.add("raising-store", "raising", _RAISING_PLUGIN)
    registry = BackendRegistry(get_plugin_manager())
    assert "ModuleNotFoundError" in registry.load_errors["broken"]
    assert "RuntimeError: misconfigured" in registry.load_errors["raising"]
    assert registry.resolve(str(tmp_path)).backend is FileSystemBackend
    with pytest.raises(UnknownBackendError, match="Plugins that failed to load: broken: ModuleNotFoundError"):
        registry.resolve("broken://x")


def test_a_plugin_whose_hook_raises_is_listed_as_broken_by_torchstow_backends(
    plugins: Plugins, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins.add_backend("alpha-store", "alpha", "AlphaBackend", ("alpha",))
    plugins.add("raising-store", "raising", _RAISING_PLUGIN)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "broken plugin 'raising': torchstow_register_backends raised RuntimeError: misconfigured" in out
    assert "alpha" in out and "plugin 'alpha' (alpha-store 1.0)" in out  # the others still serve
    torchstow.save({"w": torch.ones(2)}, f"alpha://{tmp_path}/ckpt", no_dist=True)


def test_the_register_hook_is_called_through_pluggy(tmp_path: Path) -> None:
    """pluggy's hook calling runs (its tracing and monitoring see each plugin's call),
    not the implementations called around it."""
    seen: list[tuple[str, list[str]]] = []

    class Store:
        @torchstow.spi.hookimpl
        def torchstow_register_backends(self, register: object) -> None:
            register(FileSystemBackend)  # type: ignore[operator]

    pm = PluginManager()
    pm.register(Store(), name="store")
    pm.register(Store(), name="other")
    pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    registry = BackendRegistry(pm)
    assert sorted(seen) == [
        ("torchstow_register_backends", ["other"]),
        ("torchstow_register_backends", ["store"]),
    ]
    assert registry.resolve(str(tmp_path)).backend is FileSystemBackend


_REGISTERS = """
from torchstow.spi import hookimpl
from torchstow.backends.filesystem import FileSystemBackend

class Good(FileSystemBackend):
    schemes = ("odd",)

class Bad(FileSystemBackend):
    schemes = {schemes}

@hookimpl
def torchstow_register_backends(register):
    register(Good)
    register({what})
"""


@pytest.mark.parametrize(
    ("what", "schemes", "why"),
    [
        ("dict", "()", "<class 'dict'>, which is not a torchstow Backend class"),
        ("Bad", "()", "Bad with schemes=(): it needs a tuple of scheme names"),
        ("Bad", "'bad'", "Bad with schemes='bad': it needs a tuple of scheme names"),
        ("Bad", "('my_store',)", "Bad with schemes ['my_store'], which are no URI schemes"),
    ],
)
def test_a_plugin_registering_what_is_no_backend_is_left_out_alone(
    plugins: Plugins, tmp_path: Path, what: str, schemes: str, why: str
) -> None:
    # As a plugin whose hook raises: the rest of torchstow works (this raised for every call).
    plugins.add("odd-store", "odd", _REGISTERS.format(what=what, schemes=schemes))
    registry = BackendRegistry(get_plugin_manager())
    assert registry.load_errors["odd"] == f"torchstow_register_backends registered {why}"
    with pytest.raises(UnknownBackendError, match="Plugins that failed to load: odd: "):
        registry.resolve("odd://x")  # nothing of the plugin registered, not even Good
    assert registry.resolve(str(tmp_path)).backend is FileSystemBackend
    torchstow.save({"w": torch.arange(3)}, str(tmp_path / "ckpt"))


@pytest.mark.parametrize("uri", ["file+s3://bucket/ckpt", "shm+file:///tmp/ckpt", "my_store://b/ckpt"])
def test_a_uri_no_backend_serves_never_becomes_a_local_path(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a+b:// falls back to a's plugin (for wrappers), and a scheme with "_" is none: the
    # filesystem took both as relative paths before (file+s3:/bucket/ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownBackendError, match="wraps no other URI"):
        torchstow.save({"w": torch.arange(3)}, uri)
    with pytest.raises(UnknownBackendError, match="wraps no other URI"):
        torchstow.list_checkpoints(uri)
    assert list(tmp_path.iterdir()) == []


def test_the_register_hook_is_called_once_per_registry_with_a_register_callable() -> None:
    calls = []

    class Recorder:
        @torchstow.spi.hookimpl
        def torchstow_register_backends(self, register: object) -> None:
            calls.append(register)

    pm = PluginManager()
    pm.register(Recorder(), name="recorder")
    registry = BackendRegistry(pm)
    assert len(calls) == 1
    assert callable(calls[0])
    assert registry.entries == {}
    calls[0](FileSystemBackend)  # registering after the hook returned changes nothing
    assert registry.entries == {}


def test_unknown_storage_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"does not take the storage options \['fsync_please'\].*fsync"):
        torchstow.save({}, str(tmp_path / "c"), storage_options={"fsync_please": True})


def test_a_misspelled_hook_is_an_error_not_ignored(plugins: Plugins, tmp_path: Path) -> None:
    plugins.add(
        "typo-store",
        "typo",
        """
        from torchstow.spi import hookimpl

        @hookimpl
        def torchstow_register_backend(register):
            pass
        """,
    )
    registry = BackendRegistry(get_plugin_manager())
    assert "unknown hook 'torchstow_register_backend'" in registry.load_errors["typo"]
    assert registry.resolve(str(tmp_path)).backend is FileSystemBackend

    class Typo:
        @torchstow.spi.hookimpl
        def torchstow_register_backend(self, register: object) -> None:
            pass

    pm = PluginManager()
    pm.register(Typo(), name="typo-by-hand")
    with pytest.raises(pluggy.PluginValidationError, match="torchstow_register_backend"):
        BackendRegistry(pm)


def test_a_plugin_that_registers_nothing_is_reported(
    plugins: Plugins, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins.add(
        "quiet-store",
        "quiet",
        """
        from torchstow.spi import hookimpl

        @hookimpl
        def torchstow_register_backends(register):
            pass  # forgot register(MyBackend)
        """,
    )
    plugins.add("hookless-store", "hookless", "class MyBackend: ...\n")
    registry = BackendRegistry(get_plugin_manager())
    assert registry.load_errors["quiet"] == "torchstow_register_backends registered no backend"
    assert "defines no torchstow_register_backends hook" in registry.load_errors["hookless"]
    assert registry.resolve(str(tmp_path)).backend is FileSystemBackend
    assert main(["backends"]) == 0
    shown = capsys.readouterr().out
    assert "broken plugin 'quiet': torchstow_register_backends registered no backend" in shown
    assert "broken plugin 'hookless': defines no torchstow_register_backends hook" in shown


_NEEDS_BUCKET = """
from torchstow.spi import hookimpl
from torchstow.backends.filesystem import FileSystemBackend

class NeedsBucket(FileSystemBackend):
    schemes = ("needy",)

    def __init__(self, *, bucket: str, region: str, thread_count=None, fsync=True, verify_checksums=True):
        super().__init__(thread_count=thread_count, fsync=fsync, verify_checksums=verify_checksums)

@hookimpl
def torchstow_register_backends(register):
    register(NeedsBucket)
"""


def test_a_missing_required_option_is_named_with_its_cli_flag(
    plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins.add("needy-store", "needy", _NEEDS_BUCKET)
    with pytest.raises(TypeError, match=r"needs the storage option\(s\) region: .*-o region=VALUE"):
        torchstow.list_checkpoints("needy://x", storage_options={"bucket": "b"})
    with pytest.raises(
        TypeError, match=r"bucket, region: pass storage_options=\{'bucket': ..., 'region': ...\}"
    ):
        torchstow.list_checkpoints("needy://x")
    assert main(["ls", "needy://x", "-o", "bucket=b"]) != 0
    assert "-o region=VALUE" in capsys.readouterr().err


def test_a_backend_taking_kwargs_still_names_the_options_it_takes(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['no_such_option'\].*endpoint_url.*part_size"):
        torchstow.save({}, "s3://bucket/ckpt", storage_options={"no_such_option": 1})
    with pytest.raises(TypeError, match=r"\['fsync_please'\].*fsync"):
        torchstow.save({}, f"faulty+file://{tmp_path}/c?fail=finish", storage_options={"fsync_please": True})


def test_a_plugin_whose_name_another_distribution_took_is_reported_where_its_scheme_is_missing(
    plugins: Plugins,
) -> None:
    # Both name their plugin "shm"; the first on sys.path (this one) loads, torchstow's is left
    # out. Before: only a log line said so, and shm:// was "not handled" with no reason given.
    plugins.add_backend("other-store", "shm", "OtherBackend", ("other",))
    registry = BackendRegistry(get_plugin_manager())
    assert registry.resolve("other://x").backend.__name__ == "OtherBackend"
    why = "ignored: the plugin of other-store loaded first has the same name 'shm'"
    assert registry.load_errors["shm (torchstow)"] == why
    with pytest.raises(UnknownBackendError, match=rf"Plugins that failed to load: shm \(torchstow\): {why}"):
        registry.resolve("shm://run/step-1")


def test_an_error_a_plugin_backend_raises_when_made_names_the_plugin(
    plugins: Plugins, tmp_path: Path
) -> None:
    plugins.add(
        "alpha-store",
        "alpha",
        """
        from torchstow.spi import hookimpl
        from torchstow.backends.filesystem import FileSystemBackend

        class AlphaBackend(FileSystemBackend):
            schemes = ("alpha",)

            def __init__(self, **options):
                raise RuntimeError("no credentials found")

        @hookimpl
        def torchstow_register_backends(register):
            register(AlphaBackend)
        """,
    )
    with pytest.raises(RuntimeError, match="no credentials found") as info:
        torchstow.save({"w": torch.arange(3)}, f"alpha://{tmp_path}/ckpt")
    # Before: the bare error, with nothing saying which installed plugin raised it.
    note = f"raised making AlphaBackend for 'alpha://{tmp_path}/ckpt': the backend of plugin 'alpha'"
    assert f"{note} (alpha-store 1.0)" in info.value.__notes__


def test_a_hook_that_returns_its_classes_is_told_to_call_register(plugins: Plugins) -> None:
    plugins.add(
        "returning-store",
        "returning",
        """
        from torchstow.spi import hookimpl
        from torchstow.backends.filesystem import FileSystemBackend

        class ReturnedBackend(FileSystemBackend):
            schemes = ("returned",)

        @hookimpl
        def torchstow_register_backends(register):
            return [ReturnedBackend]  # as other plugin systems' hooks do: registers nothing here
        """,
    )
    registry = BackendRegistry(get_plugin_manager())
    assert registry.load_errors["returning"] == (
        "torchstow_register_backends registered no backend (it returned "
        "[<class 'returning_plugin_module.ReturnedBackend'>]: call register(cls) instead)"
    )
