"""How `attach` changes a module's class, and how `detach` changes it back (lwat/perturb.py).

A point (and the attached model) keeps its identity, parameters, buffers and `state_dict()` keys: only its class
changes, to a subclass with a mixin in front, made once per class and reused, so that compiled graphs are shared
between instances (dynamo guards on a module's class). Public torch APIs only.
"""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def subclass(cls: type, mixin: type, name: str, **attrs) -> type:
    """`cls` with `mixin` in front, named `name`, with class attributes `attrs`."""
    return type(name, (mixin, cls), {"__module__": cls.__module__, **attrs})


def restore(modules: dict[nn.Module, type]) -> None:
    """Give each module (a key) the class it had before `subclass` put the mixin (its value) in front. All or none:
    a module whose class was replaced after attach, other than by a wrapper subclassing it, is refused first."""
    plain = {}
    for module, mixin in modules.items():
        made = next(c for c in type(module).__mro__ if c.__bases__[:1] == (mixin,))
        plain[module] = _without(type(module), made, made.__bases__[1])
    for module, cls in plain.items():
        module.__class__ = cls


@functools.cache
def _without(cls: type, made: type, plain: type) -> type:
    # `cls` without `made`. A wrapper that subclassed it after attach (FSDP2's fully_shard) keeps wrapping, around
    # the plain class; any other change of class is refused.
    if cls is made:
        return plain
    if made not in cls.__bases__:
        raise RuntimeError(f"cannot detach: {cls.__name__} replaced the class attach made ({made.__name__}); "
                           "detach before changing a point's class")
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__.replace(made.__name__, plain.__name__),
                tuple(plain if b is made else b for b in cls.__bases__), body)
