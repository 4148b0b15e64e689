"""The plugin manager: built-ins, lazy entry-point loading, and typed lookups.

The rest of TorchRecord calls :func:`get_codec` and :func:`get_serializer` and never touches
``pm.hook``. Plugins are loaded once, on the first lookup, never at ``import torchrecord``.

Environment variables:

``TORCHRECORD_STRICT_PLUGINS=1``
    a plugin that fails to load raises instead of warning.
``TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD=1``
    entry points in the ``torchrecord`` group are not loaded (built-ins still are).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import DuplicatePluginError, PluginError, UnknownPluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "DEFAULT_PLUGINS",
    "PluginInfo",
    "get_codec",
    "get_serializer",
    "list_codecs",
    "list_serializers",
    "list_clashes",
    "list_failures",
    "get_plugin_manager",
    "register_plugin",
    "unregister_plugin",
    "reset",
]

ENTRY_POINT_GROUP = "torchrecord"

DEFAULT_PLUGINS = (
    "torchrecord.codecs.raw_rgb",
    "torchrecord.codecs.jpeg",
    "torchrecord.codecs.smart",
    "torchrecord.serializers.tensorprotos",
    "torchrecord.serializers.msgpack",
)

_BUILTIN_OWNER = "torchrecord (built-in)"
_RUNTIME_OWNER = "(registered at run time)"


@dataclass(frozen=True)
class PluginInfo:
    """Who provides a registered codec or serializer."""

    kind: str  # "codec" or "serializer"
    name: str
    obj: Any
    distribution: str
    version: str
    plugin: str  # the pluggy plugin name


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _strict() -> bool:
    return _env_flag("TORCHRECORD_STRICT_PLUGINS")


class _Registry:
    """A typed layer over the pluggy PluginManager."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._owners: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._codecs: dict[str, PluginInfo] = {}
        self._serializers: dict[str, PluginInfo] = {}
        # (kind, name) -> why that name cannot be used: two installed plugins register it
        self._clashes: dict[tuple[str, str], str] = {}
        self.failures: list[str] = []  # installed plugins that failed to load or register

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            if not _env_flag("TORCHRECORD_DISABLE_PLUGIN_AUTOLOAD"):
                self._load_entry_points()
            version = _own_version()
            for module_name in DEFAULT_PLUGINS:
                if self.pm.has_plugin(module_name):
                    continue
                self.pm.register(importlib.import_module(module_name), name=module_name)
                self._owners[module_name] = (_BUILTIN_OWNER, version)
            self._check_hook_names()
            self._collect(raise_clashes=_strict())
            self._loaded = True  # only once the registries are consistent

    def _load_entry_points(self) -> None:
        strict = _env_flag("TORCHRECORD_STRICT_PLUGINS")
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "(unknown distribution)"
            dist_version = dist.version if dist is not None else "?"
            plugin_name = f"{dist_name}:{ep.name}"
            if self.pm.has_plugin(plugin_name) or self.pm.is_blocked(plugin_name):
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=plugin_name)
            except Exception as exc:  # one broken plugin must not break every program
                what = f"TorchRecord plugin {ep.name!r} from {dist_name} {dist_version}"
                why = f"{type(exc).__name__}: {exc}. Reinstall or uninstall it"
                if strict:
                    raise PluginError(
                        f"{what} failed to load (TORCHRECORD_STRICT_PLUGINS is set): {why}."
                    ) from exc
                self.failures.append(f"{what} failed to load and is ignored: {why}")
                warnings.warn(
                    f"{what} failed to load and is ignored: {why}; set "
                    "TORCHRECORD_STRICT_PLUGINS=1 to make this an error.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self._owners[plugin_name] = (dist_name, dist_version)

    def _check_hook_names(self, only: str | None = None) -> None:
        """A plugin's hook function whose name is no hook (``torchrecord_register_codec``,
        say) would register nothing, silently: say so (an error in strict mode). Every
        plugin's, or ``only`` the plugin of that name's."""
        for name, plugin in self.pm.list_name_plugin():
            if only is not None and name != only:
                continue
            callers = self.pm.get_hookcallers(plugin) or []
            unknown = sorted(caller.name for caller in callers if not caller.has_spec())
            if callers and not unknown:
                continue
            owner = self._owners.get(name, (_RUNTIME_OWNER, "-"))
            what = "is no hook" if len(unknown) == 1 else "are no hooks"
            message = (
                f"TorchRecord plugin {name} ({owner[0]} {owner[1]}) implements "
                f"{', '.join(unknown)}, which {what}, so nothing is registered through it; "
                "the hooks are torchrecord_register_codecs and torchrecord_register_serializers"
                if unknown
                else f"TorchRecord plugin {name} ({owner[0]} {owner[1]}) implements no hook, "
                "so nothing is registered through it: mark its torchrecord_register_codecs or "
                "torchrecord_register_serializers function with @torchrecord.hookimpl"
            )
            if _strict():
                raise PluginError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _collect(self, raise_clashes: bool | str = True) -> None:
        """Ask every registered plugin for its codecs and serializers, one plugin at a time.

        Calling each hook implementation on its own tells us which plugin registered which name,
        so a clash can name both owners. A plugin's names count only if its hook completes
        (one that fails half-way registers none). A name two plugins register is an error with
        ``raise_clashes`` True (strict mode), or the name of the plugin being registered at run
        time (then only its own clashes are); otherwise it is kept out of the registry, with a
        warning, and only looking it up fails: one clash among installed packages does not stop
        the other names from working.
        """
        codecs: dict[str, PluginInfo] = {}
        serializers: dict[str, PluginInfo] = {}
        clashes: dict[tuple[str, str], str] = {}
        shadowed: list[str] = []  # plugins' names that are built-ins' (ignored)
        owners_of: dict[tuple[str, str], list[str]] = {}
        plugins_of: dict[tuple[str, str], list[str]] = {}
        strict = _env_flag("TORCHRECORD_STRICT_PLUGINS")
        for kind, hook, table in (
            ("codec", self.pm.hook.torchrecord_register_codecs, codecs),
            ("serializer", self.pm.hook.torchrecord_register_serializers, serializers),
        ):
            # TorchRecord's own first, so that no plugin can take a built-in's name; then in
            # registration order
            impls = sorted(
                hook.get_hookimpls(),
                key=lambda impl: self._owners.get(impl.plugin_name, ("",))[0] != _BUILTIN_OWNER,
            )
            for impl in impls:
                owner = self._owners.get(impl.plugin_name, (_RUNTIME_OWNER, "-"))
                pending: dict[str, PluginInfo] = {}

                def register(obj: Any, _kind=kind, _impl=impl, _owner=owner, _new=pending):
                    _validate(_kind, obj, _impl.plugin_name)
                    if obj.name in _new:
                        raise DuplicatePluginError(
                            f"{_kind} name {obj.name!r} is registered twice by one plugin, "
                            f"{_impl.plugin_name} ({_owner[0]} {_owner[1]})"
                        )
                    _new[obj.name] = PluginInfo(
                        _kind, obj.name, obj, _owner[0], _owner[1], _impl.plugin_name
                    )

                try:
                    impl.function(register=register)
                except Exception as exc:
                    # Built-ins and plugins registered at run time fail loudly; an installed
                    # third-party package only warns, so it cannot break every program.
                    if owner[0] in (_BUILTIN_OWNER, _RUNTIME_OWNER) or strict:
                        raise
                    message = (
                        f"TorchRecord plugin {impl.plugin_name} ({owner[0]} {owner[1]}) failed "
                        f"while registering {kind}s, and none of them is registered: "
                        f"{type(exc).__name__}: {exc}"
                    )
                    if message not in self.failures:
                        self.failures.append(message)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    continue
                for name, info in pending.items():
                    key = (kind, name)
                    who = f"{info.distribution} {info.version} (plugin {info.plugin})"
                    if name in table and table[name].distribution == _BUILTIN_OWNER:
                        builtin = table[name]
                        message = (
                            f"TorchRecord plugin {info.plugin} ("
                            + (
                                "registered at run time"
                                if info.distribution == _RUNTIME_OWNER
                                else f"{info.distribution} {info.version}"
                            )
                            + f") registers a {kind} named {name!r}, the name of TorchRecord's "
                            f"own {kind} ({builtin.distribution} {builtin.version})"
                        )
                        if raise_clashes is True or raise_clashes == info.plugin:
                            raise DuplicatePluginError(message + ": choose another name")
                        shadowed.append(
                            f"{message}, so its {kind} is ignored: the plugin must choose "
                            "another name"
                        )
                        continue
                    if name not in table and key not in clashes:
                        table[name] = info
                        owners_of[key], plugins_of[key] = [who], [info.plugin]
                        continue
                    owners_of[key].append(who)
                    plugins_of[key].append(info.plugin)
                    message = (
                        f"{kind} name {name!r} is registered twice: by "
                        f"{' and by '.join(owners_of[key])}. Names written to disk must be "
                        "unique: uninstall one of them."
                    )
                    if raise_clashes is True or raise_clashes in plugins_of[key]:
                        raise DuplicatePluginError(message)
                    table.pop(name, None)
                    clashes[key] = message
        for message in shadowed:
            if message not in self.failures:  # (said once, not at every registration)
                self.failures.append(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        for key, message in clashes.items():
            if key not in self._clashes:  # (said once, not at every registration)
                warnings.warn(
                    message + " Until then it cannot be used; every other name can.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._codecs, self._serializers, self._clashes = codecs, serializers, clashes

    # -- run-time registration (tests, notebooks) -------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> str:
        with self._lock:
            self.ensure_loaded()
            plugin_name = self.pm.register(plugin, name=name)
            assert plugin_name is not None
            self._owners.setdefault(plugin_name, (_RUNTIME_OWNER, "-"))
            try:
                self._check_hook_names(only=plugin_name)
                self._collect(raise_clashes=True if _strict() else plugin_name)
            except Exception:
                self.pm.unregister(name=plugin_name)
                self._owners.pop(plugin_name, None)
                self._collect(raise_clashes=False)
                raise
            return plugin_name

    def unregister(self, plugin: Any = None, name: str | None = None) -> None:
        with self._lock:
            plugin_name = name if name is not None else self.pm.get_name(plugin)
            if plugin_name is None or not self.pm.has_plugin(plugin_name):
                raise PluginError(f"plugin {plugin or name!r} is not registered")
            self.pm.unregister(name=plugin_name)
            self._owners.pop(plugin_name, None)
            self._collect(raise_clashes=False)

    # -- lookups ------------------------------------------------------------------------------
    def codecs(self) -> dict[str, PluginInfo]:
        self.ensure_loaded()
        return self._codecs

    def serializers(self) -> dict[str, PluginInfo]:
        self.ensure_loaded()
        return self._serializers

    def clashes(self) -> dict[tuple[str, str], str]:
        self.ensure_loaded()
        return self._clashes


def _validate(kind: str, obj: Any, plugin_name: str) -> None:
    if isinstance(obj, type):
        raise PluginError(
            f"plugin {plugin_name} registered the class {obj.__name__} as a {kind}; register "
            f"an instance: register({obj.__name__}())"
        )
    required = ("name", "encode", "decode_image") if kind == "codec" else ("name", "dumps", "loads")
    missing = [attr for attr in required if not hasattr(obj, attr)]
    if kind == "codec":  # a Codec subclass inherits the base's, which only raise
        from .codecs.base import Codec

        missing += [
            attr
            for attr in ("encode", "decode_image")
            if attr not in missing and getattr(type(obj), attr, None) is getattr(Codec, attr)
        ]
    if missing:
        raise PluginError(
            f"plugin {plugin_name} registered a {kind} {obj!r} without {', '.join(missing)}"
        )
    version = getattr(obj, "format_version", 1)
    if type(version) is not int or version < 1:
        raise PluginError(
            f"plugin {plugin_name} registered a {kind} {obj!r} with format_version "
            f"{version!r}: use an integer of 1 or more (1 unless its records' layout changed)"
        )
    if kind == "codec" and getattr(obj, "name", None) == "custom":
        raise PluginError(f"plugin {plugin_name}: the codec name 'custom' is reserved")
    if not isinstance(obj.name, str) or not _NAME.fullmatch(obj.name):
        raise PluginError(
            f"plugin {plugin_name} registered a {kind} with an invalid name {obj.name!r}: "
            "use ASCII letters, digits and underscores"
        )


_NAME = re.compile(r"[A-Za-z0-9_]+")  # FORMAT.md 9.5: names written to disk


def _own_version() -> str:
    try:
        return metadata.version("torchrecord")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


_registry = _Registry()


def get_plugin_manager() -> pluggy.PluginManager:
    """The underlying pluggy manager, with every plugin loaded."""
    _registry.ensure_loaded()
    return _registry.pm


def get_codec(name: str) -> Any:
    """The codec registered under ``name``; :class:`UnknownPluginError` lists the others."""
    table = _registry.codecs()
    try:
        return table[name].obj
    except KeyError:
        _raise_if_clash("codec", name)
        raise UnknownPluginError("codec", name, sorted(table)) from None


def get_serializer(name: str) -> Any:
    """The serializer registered under ``name``; :class:`UnknownPluginError` lists the others."""
    table = _registry.serializers()
    try:
        return table[name].obj
    except KeyError:
        _raise_if_clash("serializer", name)
        raise UnknownPluginError("serializer", name, sorted(table)) from None


def _table(kind: str) -> dict[str, PluginInfo]:
    """The registered codecs or serializers (``kind`` "codec" or "serializer"), by name."""
    return _registry.codecs() if kind == "codec" else _registry.serializers()


def provider(kind: str, name: str) -> dict[str, Any]:
    """``{"distribution", "version", "format_version"}``: the package that provides a
    registered name, and the layout version of the records it writes."""
    table = _table(kind)
    info = table[name]
    return {
        "distribution": info.distribution,
        "version": info.version,
        "format_version": getattr(info.obj, "format_version", 1),
    }


def written_format_version(extra: dict[str, Any], kind: str, where: Any) -> int:
    """The format version of the codec or serializer a dataset was written with, as its
    manifest records it (1 when it records none: written before plugins had versions)."""
    plugins = extra.get("plugins")
    entry = plugins.get(kind) if isinstance(plugins, dict) else None
    version = entry.get("format_version", 1) if isinstance(entry, dict) else 1
    if type(version) is not int or version < 1:
        from .errors import DatasetError

        raise DatasetError(
            f"{where}: manifest.json records the invalid plugins.{kind}.format_version "
            f"{version!r} (an integer of 1 or more); restore the manifest from a copy"
        )
    return version


def for_written_version(kind: str, obj: Any, written: int, where: Any, extra: dict) -> Any:
    """``obj`` (a registered codec or serializer), or what it gives to read records of its
    format version ``written``; an error that says what to install when it cannot read them."""
    have = getattr(obj, "format_version", 1)
    if written == have:
        return obj
    from .errors import PluginVersionError

    who = (extra.get("plugins") or {}).get(kind) if isinstance(extra, dict) else None
    who = who if isinstance(who, dict) else {}
    dist, version = str(who.get("distribution") or "?"), who.get("version", "?")
    if dist == _BUILTIN_OWNER:  # (a later TorchRecord's built-in)
        dist = "torchrecord"
    if dist.startswith("(") or dist == "?":  # registered at run time, or not recorded
        source = "the plugin that wrote it"
    else:
        source = f"{dist} {version}"
    here = describe_provider(kind, obj.name)
    if written > have:
        raise PluginVersionError(
            f"{where} was written with {kind} {obj.name!r} format version {written} "
            f"({source}), but the {kind} here ({here}) reads versions up to {have}. "
            + (
                f"Upgrade it: pip install -U '{dist}'"
                if source != "the plugin that wrote it"
                else "Register the version that wrote it"
            )
        )
    adapt = getattr(obj, "for_format_version", None)
    adapted = adapt(written) if adapt is not None else obj
    if adapted is None:
        raise PluginVersionError(
            f"{where} was written with {kind} {obj.name!r} format version {written} "
            f"({source}), which the {kind} here ({here}, version {have}) no longer reads. "
            f"Install {source} to read it, or write the dataset again"
        )
    return adapted


def describe_provider(kind: str, name: str) -> str:
    """Who provides a registered codec or serializer, for messages: ``"built in"``,
    ``"registered at run time"`` or ``"from <package> <version>"``."""
    table = _table(kind)
    info = table.get(name)
    if info is None:
        return "not registered"
    if info.distribution == _BUILTIN_OWNER:
        return "built in"
    if info.distribution == _RUNTIME_OWNER:
        return "registered at run time"
    return f"from {info.distribution} {info.version}"


def is_builtin(kind: str, name: str) -> bool:
    """Whether a registered codec or serializer is one of TorchRecord's own."""
    table = _table(kind)
    info = table.get(name)
    return info is not None and info.distribution == _BUILTIN_OWNER


def _raise_if_clash(kind: str, name: str) -> None:
    message = _registry.clashes().get((kind, name))
    if message is not None:
        raise DuplicatePluginError(message)


def list_failures() -> list[str]:
    """Installed plugins that failed to load or to register (each is ignored)."""
    _registry.ensure_loaded()
    return list(_registry.failures)


def list_clashes() -> list[str]:
    """Why some names cannot be used: each is registered by two installed plugins."""
    return [message for _, message in sorted(_registry.clashes().items())]


def fast_method(obj: Any, method: str, fast: str) -> Any:
    """``obj.<fast>``, the optional faster form of ``obj.<method>`` (a codec's ``encode_parts``
    for ``encode``, a serializer's ``dumps_parts`` for ``dumps`` and ``loads_view`` for
    ``loads``), where it does what ``method`` does; else None.

    It does when the class ``method`` comes from also defines ``fast``, or made ``method`` of
    ``fast`` (see :func:`torchrecord.codecs.base.builds_record`): a subclass that overrides
    ``method`` alone is never bypassed."""
    return getattr(obj, fast) if _fast_method_applies(type(obj), method, fast) else None


@functools.cache
def _fast_method_applies(cls: type, method: str, fast: str) -> bool:
    def owner(name: str) -> type | None:
        return next((k for k in cls.__mro__ if name in vars(k)), None)

    impl, slow = owner(fast), owner(method)
    if impl is None or slow is None:
        return False
    return slow is impl or getattr(vars(slow)[method], "built_on", None) == fast


def list_codecs() -> list[PluginInfo]:
    return [info for _, info in sorted(_registry.codecs().items())]


def list_serializers() -> list[PluginInfo]:
    return [info for _, info in sorted(_registry.serializers().items())]


def carried(names: Any) -> list[tuple[str, Any]]:
    """For a process about to be started by spawn or forkserver: the ``(kind, object)`` of
    each ``(kind, name)`` in ``names`` that was registered at run time here (a new process
    does not have it) and can be pickled; :func:`adopt` registers them there. Built-ins and
    installed plugins are found by the new process itself."""
    import pickle

    found = []
    for kind, name in names:
        table = _table(kind)
        info = table.get(name)
        if info is None or info.distribution != _RUNTIME_OWNER:
            continue
        try:  # (pickled here, unpickled by adopt: one that fails there is left out, not fatal)
            found.append((kind, name, pickle.dumps(info.obj)))
        except Exception:  # (the new process then says to register it there)
            continue
    return found


def adopt(objects: list[tuple[str, str, bytes]]) -> None:
    """Register codecs and serializers :func:`carried` from the process that registered them
    at run time, unless this process knows their names already (a forked one does). One that
    cannot be unpickled here (a class defined under ``if __name__ == "__main__":``) is left
    for the program to register here itself (``worker_init_fn``)."""
    import pickle

    for kind, name, data in objects:
        table = _table(kind)
        if name in table:
            continue
        try:
            obj = pickle.loads(data)
        except Exception:
            continue
        _registry.register(_Carried(kind, obj), name=f"carried {kind} {name}")


class _Carried:
    """A plugin that registers one codec or serializer carried from another process."""

    def __init__(self, kind: str, obj: Any):
        self.kind, self.obj = kind, obj

    @hookspecs.hookimpl
    def torchrecord_register_codecs(self, register: Any) -> None:
        if self.kind == "codec":
            register(self.obj)

    @hookspecs.hookimpl
    def torchrecord_register_serializers(self, register: Any) -> None:
        if self.kind == "serializer":
            register(self.obj)


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object at run time (tests, notebooks); returns its pluggy name."""
    return _registry.register(plugin, name=name)


def unregister_plugin(plugin: Any = None, name: str | None = None) -> None:
    _registry.unregister(plugin=plugin, name=name)


def reset() -> None:
    """Forget every plugin; the next lookup loads built-ins and entry points again."""
    global _registry
    _registry = _Registry()
