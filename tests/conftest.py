import importlib.util
import os
import pathlib

# Most of the suite's time is XLA compiling many small programs. LLVM's backend
# optimisation level changes how fast the machine code runs, not what it computes (the
# HLO passes still run), and level 0 compiles about a third faster on these tests.
# Set before jax starts its backend; a level the caller chose is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
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
