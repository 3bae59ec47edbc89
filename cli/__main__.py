"""``python -m cli``: the same as the ``eventstore`` console script."""

from . import run

run()
