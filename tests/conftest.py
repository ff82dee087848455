"""The suite's fixtures, hooks and helpers live in tests/rig/ (its __init__ lists them);
this registers the fixtures' plugin for every test module."""

pytest_plugins = ["tests.rig.fixtures", "tests.rig.engine_fixtures"]
