"""Test session set-up: 8 virtual CPU devices and parsed absl flags.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs at conftest import time.
Once this process's CPU backend exists the variable is restored: subprocesses (the notebooks'
kernels, helper scripts) then run as a user's would, on one CPU device; a test that wants
virtual devices in a subprocess sets XLA_FLAGS itself (``train_process.env``).
No persistent compilation cache: on jaxlib 0.10.2 CPU a multi-device executable with several
independent all-gathers, when loaded from the cache, can run its collectives in different
orders on different virtual devices and abort in the rendezvous ('Termination timeout for
all gather'); freshly compiled executables do not, and a fresh CI clone has no cache anyway.
"""

import os
import pathlib

_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = (
    (_USER_XLA_FLAGS or "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A cache a user enabled in their shell would bring the deadlock above back.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

from absl import flags  # noqa: E402

# Grain reads absl flags directly; without this, worker processes raise UnparsedFlagAccessError.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.devices()  # creates the CPU backend, which reads XLA_FLAGS once
if _USER_XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _USER_XLA_FLAGS

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """Directory of the reference data in the repository (``tests/fixtures``, see its README)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES}: is this a complete checkout?")
    return FIXTURES


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
