"""The project's root conftest: load sdbench's pytest plugin (``pytest --benchmark``).

When sdbench is installed, its ``pytest11`` entry point (named ``harness.plugin``, like the
module) has loaded the plugin already and this line is a no-op.
"""

pytest_plugins = ["harness.plugin"]
