"""Small-integer codes for repeated strings (usernames, action types).

History indexes store a 4-byte code per row instead of a reference to a str,
which also keeps the arrays free of Python objects.
"""

from __future__ import annotations

__all__ = ["Interner"]


class Interner:
    __slots__ = ("codes", "names")

    def __init__(self, names: list[str] | None = None) -> None:
        self.names: list[str] = list(names or [])
        self.codes: dict[str, int] = {n: i for i, n in enumerate(self.names) if n}

    def code(self, name: str) -> int:
        """The code of ``name``, assigning the next free one if it is new."""
        c = self.codes.get(name)
        if c is None:
            c = len(self.names)
            self.codes[name] = c
            self.names.append(name)
        return c

    def get(self, name: str) -> int | None:
        """The code of ``name`` or None, without assigning one."""
        return self.codes.get(name)

    def forget(self, name: str) -> None:
        """Erase ``name`` (a forgotten user must not survive even here).

        Its code is left as a blank slot, never reused: rows still holding it
        were removed along with the user.
        """
        code = self.codes.pop(name, None)
        if code is not None:
            self.names[code] = ""
