import importlib.util
import os
import pathlib
import shutil
import tempfile

import pytest

# Most of the suite's time is XLA compiling many small programs. LLVM's backend
# optimisation level and its expensive passes change how fast the machine code runs,
# not what it computes (the HLO passes still run); level 0 with those passes off
# compiles these tests about a third faster. The CPU backend's MLIR fusion emitters
# take about 2.5x longer to compile a small program than its classic LLVM IR ones
# (the same fused HLO either way), so the tests use the classic ones. Set before jax
# starts its backend; flags the caller chose are kept.
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in (
    "xla_backend_optimization_level=0",
    "xla_llvm_disable_expensive_passes=true",
    "xla_cpu_use_fusion_emitters=false",
):
    if _flag.split("=")[0] not in _flags:
        _flags += " --" + _flag
os.environ["XLA_FLAGS"] = _flags.strip()

# Many tests build the same programs (the same model at the same sizes, in new
# closures). A persistent compilation cache shared by the processes of one run (the
# xdist workers and the subprocesses they start) loads a program another test has
# compiled instead of compiling it again. It lives in the temporary directory for
# the run and is removed at its end; a cache the caller chose is kept.
# (The first process to get here makes it; xdist's workers inherit its environment.)
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxseq-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import chex  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    """``chex.assert_max_traces`` counts per place of definition: each test (each
    parametrisation) starts from zero."""
    chex.clear_trace_counter()


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


def pytest_sessionfinish(session, exitstatus):
    """The run's compilation cache is removed by the process that made it (the xdist
    controller, or the only process)."""
    if _CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_CACHE, ignore_errors=True)
