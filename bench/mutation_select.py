"""pytest plugin of the mutation runs (pyproject.toml [tool.mutmut], bench/mutation.sh): per
mutant, fast tests only.

Deselects the tests that use a fixture which first trains a model or prepares the HH data
(letters_policy, trained_on_marker, hh_prepared): tens of seconds paid again for every mutant those
tests cover. The tests that run a whole train() are deselected by name in pyproject.toml (-k)."""
SLOW_FIXTURES = {"letters_policy", "trained_on_marker", "hh_prepared"}


def pytest_collection_modifyitems(config, items):
    slow = [item for item in items if SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]
