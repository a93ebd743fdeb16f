"""``@record``: a frozen, slotted, keyword-only value class, without importing dataclasses.

The worker's modules are what the forkserver preloads, and every fresh forkserver (the
first pool of every process) pays for what they import. ``dataclasses`` pulls in
``inspect``, ``ast``, ``dis`` and ``tokenize``: about 10-17 ms of a first result that
should take under 100 ms. The wire messages (protocol.py) and the error payload
(serialization.py) only need what this module gives: keyword construction with
defaults, immutability, equality and hashing by type and fields, a readable repr,
pickling, and ``match`` by keyword. The type checker sees ``dataclasses.dataclass``
itself, so constructor calls are checked as for a dataclass.

It is a decorator that builds the class anew with ``__slots__`` (as
``dataclass(slots=True)`` does): fields are the class's own annotations, in order; a
class attribute with a field's name is its default. No inheritance between records.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the forkserver does not import typing
if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from typing import Any

__all__ = ["record"]


class _Record:
    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, **values: Any) -> None:
        for name in self._fields:
            if name in values:
                value = values.pop(name)
            elif name in self._defaults:
                value = self._defaults[name]
            else:
                raise TypeError(f"{type(self).__qualname__}() missing keyword argument {name!r}")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{type(self).__qualname__}() got unexpected keyword argument(s): {', '.join(sorted(values))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__qualname__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__qualname__}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self._values())


def _rebuild(cls: type[_Record], values: tuple[Any, ...]) -> _Record:
    return cls(**dict(zip(cls._fields, values)))


if not TYPE_CHECKING:

    def record(*, frozen: bool = True, slots: bool = True, kw_only: bool = True) -> Any:
        """``dataclass(frozen=True, slots=True, kw_only=True)``, and only that."""
        if not (frozen and slots and kw_only):
            raise TypeError("record() makes frozen, slotted, keyword-only classes only")

        def make(cls: type) -> type:
            if cls.__bases__ != (object,):
                raise TypeError(f"record {cls.__qualname__} must not inherit")
            own = dict(cls.__dict__)
            fields = tuple(own.get("__annotations__", {}))
            defaults = {name: own.pop(name) for name in fields if name in own}
            for name in ("__dict__", "__weakref__"):
                own.pop(name, None)
            own.update(__slots__=fields, _fields=fields, _defaults=defaults, __match_args__=())
            return type(cls.__name__, (_Record,), own)

        return make
