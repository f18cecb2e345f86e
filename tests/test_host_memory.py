"""jaxseq.host_memory: XLA:CPU's per-call buffer is faulted in once, not at every call.

Each case runs in a fresh Python process: the settings apply at import, once per
process. Page faults are counted with ``getrusage`` (minor faults), not timed.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

import jaxseq as js

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A program whose temporary buffer is 64 MB (over glibc's largest mmap threshold, 32 MiB):
# it prints the minor page faults of each of six calls after the first, and the state.
PROBE = """
import json, resource, sys
{prelude}
import jax, jax.numpy as jnp
import jaxseq as js

@jax.jit
def f(a, b, c):
    y = a @ b  # [4096, 4096] float32: 64 MB, a temporary of the program
    return jnp.sum(jnp.sin(y) @ c)

a, b, c = jnp.full((4096, 64), 0.01), jnp.ones((64, 4096)), jnp.ones((4096, 8))
temp = f.lower(a, b, c).compile().memory_analysis().temp_size_in_bytes
f(a, b, c).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b, c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"temp": temp, "faults": faults, "state": js.host_memory.state()}}))
"""


def _probe(env, prelude=""):
    """Starts the probe in a fresh process on the CPU (``env`` added to the environment)."""
    full = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    full.pop("JAXSEQ_HOST_MEMORY", None) if "JAXSEQ_HOST_MEMORY" not in env else None
    return subprocess.Popen(
        [sys.executable, "-c", PROBE.format(prelude=prelude)],
        env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc's")
def test_the_per_call_buffer_is_faulted_in_once_and_system_faults_it_every_call():
    # the three processes at once: each is mostly its import and one compile
    procs = {
        "keep": _probe({}),
        "system": _probe({"JAXSEQ_HOST_MEMORY": "system"}),
        "late": _probe({}, prelude="import jax; jax.numpy.ones(1).block_until_ready()"),
    }
    keep = _result(procs["keep"])
    system = _result(procs["system"])
    pages = keep["temp"] // 4096
    assert keep["temp"] >= 48 << 20 and system["temp"] == keep["temp"]
    assert keep["state"] == {"policy": "keep", "reason": "mallopt applied"}
    # kept: after the heap has settled, a call faults in (almost) nothing
    assert min(keep["faults"][2:]) < pages // 20, keep["faults"]
    # left to the system (the check can fail): every call faults in the whole buffer again
    assert system["state"] == {"policy": "system", "reason": "JAXSEQ_HOST_MEMORY=system"}
    assert min(system["faults"]) > pages // 2, system["faults"]
    # a backend started before jaxseq's import: its threads have their arenas, no change
    late = _result(procs["late"])
    assert late["state"]["policy"] == "system" and "backend" in late["state"]["reason"]
    assert min(late["faults"]) > pages // 2, late["faults"]


def _state_in_fresh_process(env):
    code = "import json, jaxseq as js; print(json.dumps(js.host_memory.state()))"
    full = {**{k: v for k, v in os.environ.items() if k != "JAXSEQ_HOST_MEMORY"}, **env}
    out = subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc's")
@pytest.mark.parametrize(
    "env, reason",
    [
        ({"JAX_PLATFORMS": "cuda,cpu"}, "JAX_PLATFORMS=cuda,cpu"),
        (
            {"JAXSEQ_HOST_MEMORY": "fast"},
            "JAXSEQ_HOST_MEMORY='fast' is neither 'keep' nor 'system'",
        ),
        ({"JAXSEQ_HOST_MEMORY": " System "}, "JAXSEQ_HOST_MEMORY=system"),
    ],
)
def test_nothing_is_changed_for_an_accelerator_an_opt_out_or_an_unknown_value(env, reason):
    assert _state_in_fresh_process(env) == {"policy": "system", "reason": reason}


@pytest.mark.skipif(not GLIBC_LINUX, reason="the settings are glibc's")
def test_an_empty_setting_is_the_default():
    env = {"JAXSEQ_HOST_MEMORY": "", "JAX_PLATFORMS": "cpu"}
    assert _state_in_fresh_process(env) == {"policy": "keep", "reason": "mallopt applied"}


def test_state_is_a_copy_with_a_policy_and_a_reason():
    s = js.host_memory.state()
    assert set(s) == {"policy", "reason"} and s["policy"] in ("keep", "system")
    s["policy"] = "changed"
    assert js.host_memory.state()["policy"] != "changed"
