"""The selector registry: name -> Selector class. Every module of this package is imported once (by the
package's __init__) so that a selector registers itself with @register_selector: a new selector is
one new file here."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.selectors.base import Selector

DEFAULT_SELECTOR = "q2c"
_PLUMBING = {"base", "registry"}  # modules of the package that define no selector
_SELECTORS: dict[str, type[Selector]] = {}


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Class decorator: add a selector under its `name`. A frozen dataclass subclass of Selector with
    a name not taken yet, or ValueError (a programming error, found at import)."""
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise ValueError(f"{cls!r} is not a Selector subclass")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    params = vars(cls).get("__dataclass_params__")  # set by @dataclass on the class itself, not inherited
    if params is None or not params.frozen:
        raise ValueError(f"{cls.__name__} must be a @dataclass(frozen=True): its fields are its parameters")
    if cls.score is Selector.score:
        raise ValueError(f"{cls.__name__} does not override score()")
    if cls.name in _SELECTORS:
        raise ValueError(f"selector {cls.name!r} is already registered (by {_SELECTORS[cls.name].__name__})")
    _SELECTORS[cls.name] = cls
    return cls


def discover(package: str = "kvwire.kvcodec.selectors") -> None:
    """Import every selector module of `package` (import errors propagate: nothing is skipped)."""
    path = importlib.import_module(package).__path__
    for mod in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if mod.name not in _PLUMBING:
            importlib.import_module(f"{package}.{mod.name}")


def selector_names() -> list[str]:
    """Registered names: the default first, then alphabetical."""
    return sorted(_SELECTORS, key=lambda n: (n != DEFAULT_SELECTOR, n))


def selector_parameters(name: str) -> dict[str, object]:
    """A selector's parameters and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(_lookup(name))}


def _lookup(name: str) -> type[Selector]:
    try:
        return _SELECTORS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown selector {name!r}; known: {', '.join(selector_names())}") from None


def get_selector(name: str, **params) -> Selector:
    """A selector by name with the given parameters (the rest at their defaults). ConfigError for an
    unknown name (listing the known ones), an unknown parameter (listing the selector's) or an
    invalid value (from the selector's __post_init__)."""
    cls = _lookup(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"selector {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters: {', '.join(known) if known else 'none'}"
        )
    return cls(**params)
