"""The build and run-time configuration of the extension: which CUDA arch lists may compile the sm_90a CUTLASS GEMM,
what the extension reports about its build, and the kernel path options."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup():
    spec = importlib.util.spec_from_file_location("molm_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


def _extension_or_skip():
    ops = pytest.importorskip("molm.ops")
    if not ops.extension_available():
        pytest.skip("molm._C not built")
    from molm import _C

    return ops, _C


@pytest.mark.parametrize(
    "arch_list, usable",
    [
        ("8.0;9.0a", True),
        ("9.0a", True),
        ("8.0 9.0a+PTX", True),
        # CUTLASS compiles its kernel body to an error stub for these: the WMMA path must serve Hopper instead
        ("9.0", False),
        ("9.0+PTX", False),
        ("8.0;9.0", False),
        ("9.0;9.0a", False),
        ("10.0", False),
        ("", False),
    ],
)
def test_cutlass_gemm_is_built_only_for_an_sm90a_target(arch_list, usable):
    ok, why_not = load_setup().cutlass_sm90a_usable(arch_list)
    assert ok is usable
    assert (why_not == "") is usable and (usable or "TORCH_CUDA_ARCH_LIST" in why_not)


def test_build_info_matches_the_torch_build():
    import torch

    _, _C = _extension_or_skip()
    info = _C.build_info()
    cuda_build = torch.version.cuda is not None and os.environ.get("MOLM_CPU_ONLY", "0") != "1"
    assert set(info) == {"cuda", "cuda_archs", "cutlass_sm90a"}
    if not info["cuda"]:
        assert info["cutlass_sm90a"] is False and info["cuda_archs"] == ""
    else:
        assert cuda_build
        assert (
            info["cutlass_sm90a"] == load_setup().cutlass_sm90a_usable(info["cuda_archs"].replace("_", ";"))[0]
            or not info["cutlass_sm90a"]
        )


def test_kernel_options_set_restore_and_refuse_bad_values(kernel_options):
    ops = pytest.importorskip("molm.ops")
    if not ops.extension_available():
        pytest.skip("molm._C not built")
    defaults = {
        "sm90_gemm": "auto",
        "sb_fused": True,
        "sb_fused_backward": False,
        "sb_early_exit": True,
        "value_checks": False,
    }
    assert ops.kernel_options() == defaults
    with ops.kernel_options_scope(sm90_gemm="off", sb_fused=False):
        assert ops.kernel_options() == {**defaults, "sm90_gemm": "off", "sb_fused": False}
        previous = ops.set_kernel_options(value_checks=True)  # only the named option changes
        assert previous["value_checks"] is False and ops.kernel_options()["sb_fused"] is False
    assert ops.kernel_options() == defaults
    with pytest.raises(ValueError, match="sm90_gemm must be one of"):
        ops.set_kernel_options(sm90_gemm="1")
    assert ops.kernel_options() == defaults
    kernel_options(sb_early_exit=False)  # the fixture restores it after the test
    assert ops.kernel_options()["sb_early_exit"] is False


def test_error_messages_keep_their_numbers():
    """The extension formats numbers into its errors with the C++ runtime torch uses. A private copy of that runtime
    (an extension linked with -static-libstdc++) has no initialised locale: the message stops at the first number,
    or the process crashes."""
    import torch

    ops, _ = _extension_or_skip()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        with pytest.raises(ValueError) as info:
            ops.route_topk(torch.randn(3, 4, 2, device=device), 1)
        assert "logits must have rank 2, got rank 3 (shape [3, 4, 2])" in str(info.value)
        with pytest.raises(ValueError) as info:
            ops.route_topk(torch.randn(3, 4, device=device), 5)
        assert "k must be in 1..E = 1..4, got k = 5" in str(info.value)


def test_extension_links_the_shared_cxx_runtime():
    import shutil
    import subprocess

    _, _C = _extension_or_skip()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    dynamic = subprocess.run([readelf, "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any(name.startswith("libstdc++.so") for name in needed), needed
