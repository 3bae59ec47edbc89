"""``python -m cli``: the same as the ``eventstore`` console script."""

from .main import main

main()
