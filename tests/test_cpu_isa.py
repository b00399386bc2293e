"""The switch between the CPU kernels' instruction-set bodies (molm.ops.set_cpu_isa) and their thread pool: the sets
found match the CPU, refusal of sets the CPU lacks, bitwise repeatability within a body at any thread count, and the
pool under concurrent callers and after fork. Each op against the reference on every body: tests/test_ops.py (its
tests marked cpu_isas)."""

from __future__ import annotations

import multiprocessing
import os
import platform
import subprocess
import sys
import threading

import pytest
import torch

from molm import ops, reference

from tolerances import assert_close

pytestmark = [pytest.mark.extension, pytest.mark.usefixtures("restore_isa_and_threads")]

# /proc/cpuinfo flags each set needs (an independent reading of what the CPU has)
CPU_FLAGS = {
    "scalar": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"},
    "avx512_bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"},
}


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_supported_sets_match_the_cpu():
    supported = ops.cpu_isas()
    assert supported[0] == "scalar" and list(supported) == [n for n in ops.CPU_ISAS if n in supported]
    assert ops.cpu_isa() == supported[-1]  # the default is the best set
    flags = _cpuinfo_flags()
    if flags is None or platform.machine() != "x86_64" or "MOLM_CPU_ISA_MAX" in os.environ:
        pytest.skip("needs /proc/cpuinfo of an x86-64 CPU")
    assert supported == [name for name in ops.CPU_ISAS if CPU_FLAGS[name] <= flags]


@pytest.mark.parametrize("name", ops.CPU_ISAS)
def test_set_isa_refuses_sets_the_cpu_lacks(name):
    if name in ops.cpu_isas():
        ops.set_cpu_isa(name)
        assert ops.cpu_isa() == name
    else:
        before = ops.cpu_isa()
        with pytest.raises(ValueError, match=f"'{name}' is not supported by this CPU"):
            ops.set_cpu_isa(name)
        assert ops.cpu_isa() == before


def test_set_isa_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown name 'avx1024'.*'scalar', 'avx2', 'avx512', 'avx512_bf16'"):
        ops.set_cpu_isa("avx1024")


@pytest.mark.parametrize("cap", ["scalar", "avx2"])
def test_isa_cap_refuses_newer_sets(cap):
    """MOLM_CPU_ISA_MAX makes the process behave as on a CPU without the newer sets: they are refused."""
    code = (
        "from molm import ops\n"
        "print(ops.cpu_isa(), ','.join(ops.cpu_isas()))\n"
        "try:\n    ops.set_cpu_isa('avx512')\nexcept ValueError as e:\n    print('refused:', e)\n"
    )
    env = dict(os.environ, MOLM_CPU_ISA_MAX=cap)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    allowed = ops.CPU_ISAS[: ops.CPU_ISAS.index(cap) + 1]
    assert lines[0] == f"{cap} {','.join(allowed)}"
    assert lines[1].startswith("refused:") and "'avx512' is not supported" in lines[1]


# ---------------------------------------------------------------------------------------------- bodies
def _gemm_inputs(rows, k_in, n_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0] + rows).cumsum(0)
    x = torch.randn(sum(rows), k_in, generator=g).to(dtype)
    weight = (torch.randn(len(rows), k_in, n_out, generator=g) * k_in**-0.5).to(dtype)
    return x, weight, offsets


@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_repeatable_at_any_thread_count(dtype, device):
    """Within one body, expert_gemm (several depth chunks and column blocks) and decode attention (several key
    chunks) are bitwise identical run after run and at 1, 2 and 3 threads."""
    x, weight, offsets = _gemm_inputs([1, 3, 0, 2, 16], 1000, 1100, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 2, 3, 64, generator=g).to(dtype)
    k = torch.randn(2, 1300, 3, 64, generator=g).to(dtype)
    v = torch.randn(2, 1300, 3, 64, generator=g).to(dtype)
    results = []
    for threads in (1, 2, 3, 2):
        torch.set_num_threads(threads)
        results.append((ops.expert_gemm(x, weight, offsets, "gelu_new"), ops.sb_attention(q, k, v, None, 0.125)))
    for gemm, att in results[1:]:
        assert torch.equal(gemm, results[0][0]) and torch.equal(att, results[0][1])


@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_attention_at_head_sizes_off_the_vector_width(dtype, device):
    """The decode attention's dot / axpy / widening bodies over head sizes that leave a partial vector (and none)."""
    g = torch.Generator().manual_seed(6)
    for head in (1, 7, 15, 16, 17, 33, 65, 130):
        q = torch.randn(2, 1, 2, 3, head, generator=g).to(dtype)
        k, v = (torch.randn(2, 40, 3, head, generator=g).to(dtype) for _ in range(2))
        exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), None, head**-0.5)
        lowp = reference.sb_attention_ref(q, k, v, None, head**-0.5)
        assert_close(ops.sb_attention(q, k, v, None, head**-0.5), exact, lowp, dtype, f"head size {head}")


def test_bodies_agree_within_tolerance():
    """All supported bodies give the same decode GEMM up to rounding, so switching sets never changes a model's
    output beyond the usual tolerance."""
    x, weight, offsets = _gemm_inputs([1, 2, 0, 1], 768, 544, torch.bfloat16, seed=5)
    ref = reference.expert_gemm_ref(x.float(), weight.float(), offsets, "none")
    lowp = reference.expert_gemm_ref(x, weight, offsets, "none")
    for isa in ops.cpu_isas():
        ops.set_cpu_isa(isa)
        assert_close(ops.expert_gemm(x, weight, offsets, "none"), ref, lowp, torch.bfloat16, isa)


# ---------------------------------------------------------------------------------------------- thread pool
def test_concurrent_callers_get_correct_results():
    """Several Python threads calling the ops at once (one holds the pool, the others run inline) all get the
    single-caller result, bitwise; repeated 20 times."""
    torch.set_num_threads(2)
    x, weight, offsets = _gemm_inputs([1, 2, 1, 4], 512, 1024, torch.float32, seed=6)
    expected = ops.expert_gemm(x, weight, offsets, "none")
    errors = []

    def call():
        for _ in range(5):
            if not torch.equal(ops.expert_gemm(x, weight, offsets, "none"), expected):
                errors.append("mismatch")

    for _ in range(20):
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


_FORK_INPUTS = {}


def _child_gemm(conn):
    # only molm ops here: GNU OpenMP (ATen's own parallel ops) cannot start a thread team in a forked child
    torch.set_num_threads(2)
    conn.send(torch.equal(ops.expert_gemm(*_FORK_INPUTS["args"], "none"), _FORK_INPUTS["expected"]))
    conn.close()


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_pool_works_in_a_forked_child():
    """The parent's pool has run (its workers exist); a forked child has none of them and must still finish."""
    torch.set_num_threads(2)
    _FORK_INPUTS["args"] = _gemm_inputs([1, 2, 1, 4], 512, 1024, torch.float32, seed=6)
    _FORK_INPUTS["expected"] = ops.expert_gemm(*_FORK_INPUTS["args"], "none")
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_gemm, args=(child,))
        proc.start()
        answered = parent.poll(60)
        if not answered:
            proc.kill()
        assert answered, "forked child did not answer"
        assert parent.recv() is True, "the child's result differs from the parent's"
        proc.join(10)
        assert proc.exitcode == 0
