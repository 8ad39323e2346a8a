"""Pruners by name: `build_pruner("litelvlm", num_tokens=192)` or by class path, as timm's create_model."""

from __future__ import annotations

import importlib

from litelvlm.pruners.base import PrunerError, TokenPruner

_REGISTRY: dict[str, type[TokenPruner]] = {}


def register_pruner(short_name: str):
    """Class decorator: make a pruner buildable (and nameable in configs) by `short_name`."""

    def decorator(cls: type[TokenPruner]) -> type[TokenPruner]:
        if not (isinstance(cls, type) and issubclass(cls, TokenPruner)):
            raise TypeError(f"{cls!r} is not a TokenPruner subclass")
        if short_name in _REGISTRY and _REGISTRY[short_name] is not cls:
            raise ValueError(f"pruner name '{short_name}' is already taken by {_REGISTRY[short_name].__qualname__}")
        cls.short_name = short_name
        _REGISTRY[short_name] = cls
        return cls

    return decorator


def list_pruners() -> list[str]:
    return sorted(_REGISTRY)


def class_path_of(short_name: str) -> str | None:
    """The import path of a registered pruner, or None if the name is not registered."""
    cls = _REGISTRY.get(short_name)
    return None if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def resolve_pruner_class(name: str) -> type[TokenPruner]:
    """A registered short name, a class name of a registered pruner, or a dotted class path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    by_class_name = [cls for cls in _REGISTRY.values() if cls.__name__ == name]
    if by_class_name:
        return by_class_name[0]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise PrunerError(f"cannot import pruner class '{name}': {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, TokenPruner)):
            raise PrunerError(f"'{name}' is not a TokenPruner subclass")
        return cls
    raise PrunerError(f"unknown pruner '{name}'; registered pruners: {', '.join(list_pruners())}")


def build_pruner(name: str, **kwargs) -> TokenPruner:
    """Build a pruner from a registered short name or a class path, with its init arguments."""
    cls = resolve_pruner_class(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise PrunerError(f"bad arguments for pruner '{name}': {err}") from None
