"""Out of GPU memory: a clear torch.OutOfMemoryError (what was asked for, what is free), never a crash or an
illegal-address error, and the process stays usable afterwards. Run by bench/gpu_sanitize.sh (without a
sanitizer: compute-sanitizer reports the failed cudaMalloc itself as an API error)."""

import gc
import os

import pytest
import torch

import molm
from molm import ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DATA = os.path.join(os.path.dirname(__file__), "data")


def too_many_bytes() -> int:
    free, total = torch.cuda.mem_get_info()
    return 2 * total


@pytest.fixture(scope="module")
def model():
    return molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, device="cuda")


def test_generate_with_a_kv_cache_larger_than_the_device(model):
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda")
    expected = molm.generate(model, ids, max_new_tokens=8)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    per_position = model.config.n_layer * model.config.n_embd * 4  # fp32 keys (K = V in MoLM)
    huge = too_many_bytes() // per_position
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        molm.generate(model, ids, max_new_tokens=huge)
    gc.collect()  # the exception's traceback frames are gone
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline  # nothing half-allocated is left behind
    assert torch.equal(molm.generate(model, ids, max_new_tokens=8), expected)  # still usable, same answer


def test_op_output_larger_than_the_device():
    """gather_rows of one row many times: small inputs, an output that cannot fit."""
    width = 1 << 16
    x = torch.randn(1, width, device="cuda")
    index = torch.zeros(too_many_bytes() // (4 * width) + 1, dtype=torch.int64, device="cuda")
    try:
        with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
            ops.gather_rows(x, index)
    except NotImplementedError as exc:  # no CUDA kernel for this op in this build
        pytest.skip(f"gather_rows has no CUDA kernel: {str(exc).splitlines()[0]}")
    torch.cuda.synchronize()
    assert torch.equal(ops.gather_rows(x, index[:3]), x.expand(3, width))


def test_cli_reports_oom_in_one_line(capsys):
    from molm.cli import main

    huge = too_many_bytes() // (2 * 64 * 4)
    code = main(
        [
            "generate",
            "--model",
            os.path.join(DATA, "molm-tiny-a"),
            "hi",
            "--device",
            "cuda",
            "--dtype",
            "float32",
            "--max-new-tokens",
            str(huge),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("molm: error:") and "out of memory" in err
    assert "Traceback" not in err
