"""Shared fixtures, markers and options.

- `device`: a test that takes it runs once per device, "cpu" and "cuda" (the cuda runs carry the `cuda` marker and
  are skipped without a CUDA device). `@pytest.mark.devices("cpu")` limits a test to some of them;
  `@pytest.mark.cpu_isas` runs it on the CPU once per instruction set of molm.ops.CPU_ISAS instead (ids cpu-scalar,
  cpu-avx2, ...; the sets this CPU lacks are skipped), with that set active during the test.
- `@pytest.mark.extension`: needs the compiled molm._C. Skipped when it is not built, failed instead with
  --require-extension (MOLM_REQUIRE_EXTENSION=1 sets it, as CI does).
- `kernel_options`: set molm's CUDA kernel options for one test.
- `restore_isa_and_threads`: the test may change molm's CPU instruction set and torch's thread count; both are put
  back afterwards (`pytestmark = pytest.mark.usefixtures("restore_isa_and_threads")` for a whole module).
"""

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--require-extension",
        action="store_true",
        default=os.environ.get("MOLM_REQUIRE_EXTENSION") == "1",
        help="fail, rather than skip, the tests that need molm._C when it is not built (MOLM_REQUIRE_EXTENSION=1)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "extension: needs the compiled molm._C")
    config.addinivalue_line("markers", "devices(*names): run on these of the `device` fixture's devices only")
    config.addinivalue_line("markers", "cpu_isas: run on the CPU once per instruction set molm.ops.CPU_ISAS names")


def extension_error() -> str | None:
    """Why molm._C cannot be used, or None when it can."""
    try:
        from molm import ops
    except ImportError as e:
        return str(e)
    return None if ops.extension_available() else str(ops.extension_error())


def supported_cpu_isas() -> list[str] | None:
    """The instruction sets this CPU runs, or None without the extension (the tests skip then anyway)."""
    if extension_error() is not None:
        return None
    from molm import ops

    return ops.cpu_isas()


def pytest_generate_tests(metafunc):
    if "device" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("devices")
    devices = marker.args if marker else ("cpu", "cuda")
    params = []
    if "cpu" in devices:
        if metafunc.definition.get_closest_marker("cpu_isas"):
            from molm.ops import CPU_ISAS

            supported = supported_cpu_isas()
            for isa in CPU_ISAS:
                lacking = supported is not None and isa not in supported
                marks = pytest.mark.skipif(lacking, reason=f"this CPU lacks {isa}")
                params.append(pytest.param(("cpu", isa), id=f"cpu-{isa}", marks=marks))
        else:
            params.append(pytest.param(("cpu", None), id="cpu"))
    if "cuda" in devices:
        marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
        params.append(pytest.param(("cuda", None), id="cuda", marks=marks))
    metafunc.parametrize("device", params, indirect=True)


@pytest.fixture
def device(request):
    """ "cpu" or "cuda"; on the CPU with the instruction set of the test's id active, restored afterwards."""
    name, isa = request.param
    if isa is None:
        yield name
        return
    from molm import ops

    saved = ops.cpu_isa()
    ops.set_cpu_isa(isa)
    try:
        yield name
    finally:
        ops.set_cpu_isa(saved)


def pytest_runtest_setup(item):
    if item.get_closest_marker("extension") and (error := extension_error()) is not None:
        if item.config.getoption("require_extension"):
            pytest.fail(f"molm._C is not usable ({error}) and the extension is required", pytrace=False)
        pytest.skip(f"molm._C not built: {error}")


@pytest.fixture
def kernel_options():
    """Set molm's CUDA kernel options (molm.ops.set_kernel_options) for one test; restored afterwards."""
    from molm import ops

    saved = ops.kernel_options()
    yield lambda **options: ops.set_kernel_options(**options)
    ops.set_kernel_options(**saved)


@pytest.fixture
def restore_isa_and_threads():
    """Puts molm's CPU instruction set and torch's thread count back after the test."""
    from molm import ops

    isa, threads = ops.cpu_isa(), torch.get_num_threads()
    yield
    ops.set_cpu_isa(isa)
    torch.set_num_threads(threads)
