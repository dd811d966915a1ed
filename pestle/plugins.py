"""Name-based registries, so a user adds a sampler, potential, selector, labeller or
trainer by decorating a class, without touching the engine, in pestle or in a package of
their own.

Each registered class has a nested pydantic ``Params`` model (``extra="forbid"``) and a
constructor taking one ``Params`` instance. ``Registry.build(name, params)`` validates the
YAML mapping against ``Params``; ``format_validation_error`` names the config field at fault.

A class whose use needs an optional part of pestle declares it: ``requires_extra = "gpaw"``
(see ``pestle.extras``); validating its params or building it without that extra installed
raises ``pestle.extras.MissingExtra``, naming the pip extra to install.

Implementations in other packages are found through entry points: a distribution declares
``[project.entry-points."pestle.samplers"] my-sampler = "my_pkg.sampler:MySampler"`` and the
registry imports ``my_pkg.sampler`` the first time ``my-sampler`` is looked up (the module's
``@SAMPLERS.register("my-sampler")`` does the registering, as for a built-in).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown implementation name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class PluginLoadError(RegistryError):
    """An entry point that cannot be imported, or that does not register what it names."""


class PluginSpec(BaseModel):
    """``{name: <registered name>, params: {...}}``: which implementation, with which params
    (config sections, and the potential a sampler drives its dynamics with)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a registered implementation (pestle plugins lists them)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="its params, checked against its own Params model"
    )


def default_name(name: str) -> BeforeValidator:
    """Annotation for a ``PluginSpec`` field whose YAML may leave ``name`` out, meaning
    ``name`` (``potential: {params: {...}}`` in a sampler: the default potential)."""

    def fill(value: Any) -> Any:
        if isinstance(value, Mapping) and "name" not in value:
            return {"name": name, **value}
        return value

    return BeforeValidator(fill)


log = logging.getLogger("pestle.plugins")
_warned: set[str] = set()


def old_names(params: type[BaseModel]) -> dict[str, str]:
    """``{old spelling: field}`` of a Params model whose fields were renamed. A renamed field
    declares its old spellings as ``Field(validation_alias=AliasChoices(field, old, ...))``:
    pydantic then reads either, and the field's own name is the one schemas and dumps use."""
    out = {}
    for name, info in params.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            for choice in info.validation_alias.choices:
                if isinstance(choice, str) and choice != name:
                    out[choice] = name
    return out


def renamed_fields(where: str) -> Any:
    """A ``model_validator(mode="before")`` for a Params model with renamed fields (see
    :func:`old_names`): an old spelling is still read, with a warning (once per process)
    naming the new one; both spellings at once is an error. ``where``: the plugin, as a user
    finds it in a config (``trainer chgnet``). Use: ``_old = renamed_fields("trainer x")``
    in the class body."""

    def check(cls: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        for old, new in old_names(cls).items():
            if old not in data:
                continue
            if new in data:
                raise ValueError(f"give {new} or its old name {old}, not both")
            message = (
                f"{where}: params.{old} is deprecated, it is now params.{new} (the old name "
                "is still read; rename it in the config)"
            )
            if message not in _warned:
                _warned.add(message)
                log.warning(message)
        return data

    return model_validator(mode="before")(classmethod(check))


@dataclass(frozen=True)
class Resources:
    """What one call of a labeller (one calculation) or a trainer (one fine-tune) occupies
    on a Dask worker. For a trainer ``gpus=1`` means: prefers a GPU, falls back to the CPU."""

    cpus: int = 1
    gpus: int = 0


def accepts_any_structures(self, structures) -> None:
    """The default ``check_structures`` of a plugin: nothing to check against structures."""
    return None


@dataclass(frozen=True)
class Contract:
    """What a registry demands of a class when it registers, so callers rely on declared
    attributes instead of probing with ``hasattr``.

    ``methods``: every implementation defines them. ``defaults``: class declarations an
    implementation may leave out, set to the protocol's default on registration.
    ``promises``: a declaration that, when truthy, obliges the class to define more methods
    (e.g. ``supports_embeddings`` -> ``embed``)."""

    methods: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    promises: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def check(self, kind: str, name: str, cls: type) -> None:
        if not isinstance(getattr(cls, "Params", None), type) or not issubclass(
            cls.Params, BaseModel
        ):
            raise TypeError(f"{kind} {name!r} ({cls.__qualname__}) needs a nested pydantic Params")
        for key, value in self.defaults.items():
            if not hasattr(cls, key):
                setattr(cls, key, value)
        wanted = list(self.methods)
        for declaration, methods in self.promises.items():
            if getattr(cls, declaration):
                wanted += methods
        missing = [m for m in wanted if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(
                f"{kind} {name!r} ({cls.__qualname__}) lacks {', '.join(m + '()' for m in missing)}"
            )


def distribution(ep: EntryPoint) -> str | None:
    """``name version`` of the distribution that declares an entry point."""
    dist = getattr(ep, "dist", None)  # None for an EntryPoint made by hand
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else None


def entry_point_origin(ep: EntryPoint) -> str:
    """``entry point 'x = pkg.mod:Cls' (distribution dist 1.0)``: enough to find the culprit."""
    where = distribution(ep) or "unknown"
    return f"entry point '{ep.name} = {ep.value}' in group {ep.group} (distribution {where})"


class Registry(Generic[T]):
    """Implementations of one kind by name: registered built-ins, and entry points of
    ``group`` loaded on the first lookup of their name."""

    def __init__(self, kind: str, group: str, contract: Contract | None = None) -> None:
        self.kind = kind
        self.group = group
        self.contract = contract or Contract()
        self._items: dict[str, type] = {}
        self._entry_points: dict[str, EntryPoint] | None = None

    def register(self, name: str) -> Callable[[type], type]:
        def decorate(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered by {self._items[name]}"
                )
            self.contract.check(self.kind, name, cls)
            cls.name = name
            self._items[name] = cls
            return cls

        return decorate

    def entry_points(self) -> dict[str, EntryPoint]:
        """Entry points of this registry's group by name (read once per process); a name
        pestle registers itself is never taken from another package."""
        if self._entry_points is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                found.setdefault(ep.name, ep)  # the first on sys.path wins, as for imports
            self._entry_points = found
        return self._entry_points

    def get(self, name: str) -> type:
        if name in self._items:
            return self._items[name]
        ep = self.entry_points().get(name)
        if ep is None:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._load(name, ep)

    def _load(self, name: str, ep: EntryPoint) -> type:
        origin = entry_point_origin(ep)
        try:
            loaded = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.kind} {name!r}: {origin} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        registered = self._items.get(name)
        if registered is not loaded:
            actually = [n for n, cls in self._items.items() if cls is loaded]
            how = (
                f"it registers {loaded!r} as {actually[0]!r}"
                if actually
                else f"{loaded!r} is not registered as {self.kind} {name!r} (decorate it with "
                f"@{self.kind.upper()}S.register({name!r}), {self.kind.upper()}S imported from "
                f"{self.group})"
            )
            raise PluginLoadError(f"{self.kind} {name!r}: {origin}: {how}")
        return registered

    def names(self) -> list[str]:
        """Every known name: registered ones and entry points (not imported yet)."""
        return sorted(set(self._items) | set(self.entry_points()))

    def origin(self, name: str) -> str:
        """Where an implementation comes from: ``pestle``, the distribution of its entry
        point, or the module that registered it."""
        ep = self.entry_points().get(name)
        cls = self._items.get(name)
        # An entry point counts when it is where the class came from (a built-in of the
        # same name wins over it, and its module may have been imported directly).
        if ep is not None and (cls is None or cls.__module__ == ep.module):
            return distribution(ep) or ep.value
        module = self.get(name).__module__
        return "pestle" if module.split(".")[0] == "pestle" else f"module {module}"

    def missing_extra(self, name: str) -> str | None:
        """The pip extra ``name`` needs and that is not installed, or None."""
        from pestle.extras import missing_modules

        extra = getattr(self.get(name), "requires_extra", None)
        return extra if extra and missing_modules(extra) else None

    def require_extra(self, name: str) -> None:
        """Raise ``pestle.extras.MissingExtra`` when ``name`` needs an extra not installed."""
        from pestle.extras import require

        extra = getattr(self.get(name), "requires_extra", None)
        if extra:
            require(extra, f"{self.kind} {name!r}")

    def validate_params(self, name: str, params: Mapping[str, Any] | None) -> BaseModel:
        """Validate a params mapping; raises pydantic ValidationError on bad input, and
        MissingExtra when the implementation's extra is not installed."""
        self.require_extra(name)
        return self.get(name).Params.model_validate(dict(params or {}))

    def build(self, name: str, params: Mapping[str, Any] | BaseModel | None = None) -> T:
        self.require_extra(name)
        cls = self.get(name)
        if not isinstance(params, BaseModel):
            params = cls.Params.model_validate(dict(params or {}))
        return cls(params)

    def build_spec(self, spec: PluginSpec) -> T:
        return self.build(spec.name, spec.params)


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package, so that a new implementation file registers itself
    by being there (call at the bottom of the package's ``__init__``)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: ``field.path: reason``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        field_path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        lines.append(f"{field_path}: {err['msg']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: str  # repr of the default, or "(required)"
    description: str


@dataclass(frozen=True)
class PluginInfo:
    """One implementation as ``pestle plugins`` shows it: name, where it comes from (``pestle``
    or a distribution), the first paragraph of its docstring, its params; or why it cannot be
    loaded (``error``); the extra to install before it can be used (``missing_extra``)."""

    name: str
    origin: str
    summary: str = ""
    params: tuple[ParamInfo, ...] = ()
    error: str | None = None
    missing_extra: str | None = None  # the pip extra it needs and that is not installed


def _summary(cls: type) -> str:
    import sys

    text = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    paragraph = text.split("\n\n")[0]  # the first paragraph, whole, not its first line
    return " ".join(line.strip() for line in paragraph.splitlines())


def _type_name(annotation: Any) -> str:
    import re
    import typing

    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    text = re.sub(r"Annotated\[([\w.]+), [^\]]*\]", r"\1", str(annotation))
    return text.replace("typing.", "")


def describe_plugins(registry: Registry) -> list[PluginInfo]:
    """Every implementation of a registry, built-ins and entry points, with its params. An
    entry point that cannot be loaded is described by its error; the rest are still listed."""
    from pydantic_core import PydanticUndefined

    out = []
    for name in registry.names():
        origin = registry.origin(name)
        try:
            cls = registry.get(name)
        except RegistryError as exc:
            out.append(PluginInfo(name, origin, error=f"cannot be used: {exc}"))
            continue
        params = []
        for field_name, info in cls.Params.model_fields.items():
            if info.default is not PydanticUndefined:
                default = repr(info.default)
            elif info.default_factory is not None:
                default = repr(info.default_factory())
            else:
                default = "(required)"
            params.append(
                ParamInfo(field_name, _type_name(info.annotation), default, info.description or "")
            )
        out.append(
            PluginInfo(name, origin, _summary(cls), tuple(params),
                       missing_extra=registry.missing_extra(name))
        )  # fmt: skip
    return out
