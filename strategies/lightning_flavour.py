"""Which Lightning package a user's class is written against.

Lightning ships twice: ``pytorch_lightning`` and the unified ``lightning`` package
(``import lightning as L``; ``L.LightningModule`` is ``lightning.pytorch.LightningModule``).
The two have the same API but separate class hierarchies: a ``lightning.pytorch`` module is
not a ``pytorch_lightning.LightningModule`` and must be driven by ``lightning.pytorch``'s own
Trainer, Strategy and plugins (docs/lightning-modules.md). Everything here finds the flavour
from the class itself, so neither package has to be installed for modules of the other.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

FLAVOURS = ("pytorch_lightning", "lightning.pytorch")


def flavour_of(obj: Any) -> ModuleType | None:
    """The Lightning package (``pytorch_lightning`` or ``lightning.pytorch``) that ``obj`` (a
    class or an instance) derives from, or None when it derives from neither."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        home = klass.__module__ or ""
        for name in FLAVOURS:
            if home == name or home.startswith(name + "."):
                return importlib.import_module(name)
    return None


def _bases(cls: type) -> str:
    return ", ".join(f"{b.__module__}.{b.__qualname__}" for b in cls.__mro__[1:-1]) or "object only"


def require_subclass(cls: Any, kind: str, where: str) -> ModuleType:
    """The flavour of ``cls``, which must subclass ``<flavour>.<kind>`` (``LightningModule``
    or ``LightningDataModule``); otherwise ``ValueError`` naming the class and its bases."""
    if not isinstance(cls, type):
        raise ValueError(f"{where}: {cls!r} is not a class; give a {kind} subclass as package.module:Class")
    flavour = flavour_of(cls)
    if flavour is None or not issubclass(cls, getattr(flavour, kind)):
        raise ValueError(f"{where}: {cls.__module__}.{cls.__qualname__} is not a {kind} subclass (its bases: "
                         f"{_bases(cls)}); derive it from pytorch_lightning.{kind} or lightning.pytorch.{kind} "
                         f"(`import lightning as L; class X(L.{kind})`)")
    return flavour


def base_class(obj: Any, kind: str = "LightningModule") -> type:
    """``<flavour of obj>.<kind>``: the base whose hooks a module may override."""
    flavour = flavour_of(obj)
    assert flavour is not None, f"{type(obj).__name__} is no Lightning class"
    return getattr(flavour, kind)


def submodule(obj: Any, path: str) -> ModuleType:
    """``<flavour of obj>.<path>``, e.g. ``submodule(module, "plugins.precision")``."""
    flavour = flavour_of(obj)
    assert flavour is not None, f"{type(obj).__name__} is no Lightning class"
    return importlib.import_module(f"{flavour.__name__}.{path}")
