"""``python -m cli``: the same as the ``eventstore`` console script."""

from .main import app

app(prog_name="eventstore")
