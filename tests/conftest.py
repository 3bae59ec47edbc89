"""Load the test kit's plugin when the package is not installed.

Installed (``pip install -e .``), pytest loads ``eventstore.testing.plugin``
through the ``pytest11`` entry point named ``eventstore``; registering the
module a second time would fail, so load it here only when it is missing
(a plain checkout, or ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``).
"""

from __future__ import annotations

import pytest

PLUGIN = "eventstore.testing.plugin"


def pytest_configure(config: pytest.Config) -> None:
    manager = config.pluginmanager
    if not (manager.hasplugin("eventstore") or manager.hasplugin(PLUGIN)):
        manager.import_plugin(PLUGIN)
