import importlib.util
import pathlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def load_example():
    """Imports ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    root = pathlib.Path(__file__).resolve().parent.parent

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / "examples" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
