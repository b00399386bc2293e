"""molm::linear (nn.Linear layout: lm_head, routers, K/V projections) against F.linear in fp64: every dtype, the
decode-sized streaming path and the at::mm path, bias, the exact GELU the routers apply, strided weights,
thread-count independence, gradients, the fake kernel and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from molm import ops, reference

from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="molm._C not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(m, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1024, 4099), (2, 64, 7), (4, 33, 5), (16, 1000, 130), (17, 64, 40), (64, 256, 300), (1, 3, 1), (3, 31, 2)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(m, k, n, dtype, bias):
    x, w, b = _inputs(m, k, n, dtype, bias)
    out = ops.linear(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    exact = reference.linear_ref(x.double(), w.double(), None if b is None else b.double())
    lowp = reference.linear_ref(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert_close(out, exact, lowp, dtype, f"linear {dtype} m={m} k={k} n={n}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("m,k,n", [(1, 1024, 256), (3, 64, 37), (16, 200, 33), (40, 96, 70)])  # GEMV, then at::mm
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_matches_reference(m, k, n, dtype, bias):
    x, w, b = _inputs(m, k, n, dtype, bias, seed=m)
    x = x * 3  # pre-activations across GELU's curved range
    out = ops.linear(x, w, b, "gelu")
    assert out.dtype == dtype and out.shape == (m, n)
    exact = F.gelu(reference.linear_ref(x.double(), w.double(), None if b is None else b.double()))
    lowp = reference.linear_ref(x.float(), w.float(), None if b is None else b.float(), "gelu").to(dtype)
    assert_close(out, exact, lowp, dtype, f"linear gelu {dtype} m={m}")
    assert (out.double() < 0).any() and (exact < 0).any()  # the negative lobe is there: not a ReLU, not the identity
    assert torch.equal(ops.linear(x, w, b, "gelu"), out)


def test_linear_gelu_gradients_and_opcheck():
    x, w, b = (t.double().requires_grad_(True) for t in _inputs(3, 7, 5, torch.float64))
    torch.autograd.gradcheck(lambda x, w, b: ops.linear(x, w, b, "gelu"), (x, w, b))
    torch.library.opcheck(torch.ops.molm.linear.default, (*_inputs(2, 16, 8, torch.float32), "gelu"))
    x, w, b = _inputs(2, 32, 16, torch.float32)
    compiled = torch.compile(lambda x: ops.linear(x, w, b, "gelu"), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


def test_linear_unknown_activation_is_named():
    x, w, b = _inputs(2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="activation must be 'none' or 'gelu', got 'relu'"):
        torch.ops.molm.linear(x, w, b, "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.linear_ref(x, w, b, "relu")


def test_linear_leading_dims_and_strided_weight():
    x, w, b = _inputs(6, 64, 48, torch.bfloat16)
    wide = torch.zeros(48, 80, dtype=torch.bfloat16)
    wide[:, 8:72] = w  # row stride 80, stride(-1) == 1
    out = ops.linear(x.view(2, 3, 64), wide[:, 8:72], b)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out.view(6, 48), ops.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_rows_are_independent_of_the_batch_and_threads(dtype):
    x, w, b = _inputs(8, 512, 1000, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear(x, w, b)
        torch.set_num_threads(max(2, threads))
        many = ops.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    for i in range(8):  # a row alone gives what it gives inside the batch
        assert torch.equal(ops.linear(x[i : i + 1], w, b), one[i : i + 1])


def test_linear_gradients():
    x, w, b = (t.double().requires_grad_(True) for t in _inputs(3, 7, 5, torch.float64))
    torch.autograd.gradcheck(lambda x, w, b: ops.linear(x, w, b), (x, w, b))
    torch.library.opcheck(torch.ops.molm.linear.default, _inputs(2, 16, 8, torch.float32))
    torch.library.opcheck(torch.ops.molm.linear.default, _inputs(2, 16, 8, torch.float32, bias=False))


def test_linear_compiles_with_the_fake_kernel():
    x, w, b = _inputs(2, 32, 16, torch.float32)
    compiled = torch.compile(lambda x: ops.linear(x, w, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args,exc,needle",
    [
        (lambda: (torch.randn(2, 8), torch.randn(4, 7), None), ValueError, "must have K == x.size(1) = 8"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), TypeError, "weight must have the dtype of x"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), ValueError, "bias.numel()"),
        (lambda: (torch.randn(2, 8), torch.randn(8, 4).t(), None), ValueError, "stride(-1) == 1"),
        (lambda: (torch.randn(2, 8).int(), torch.randn(4, 8).int(), None), TypeError, "must be float32"),
    ],
)
def test_linear_bad_inputs_name_the_problem(args, exc, needle):
    with pytest.raises(exc, match=__import__("re").escape(needle)) as info:
        torch.ops.molm.linear(*args())
    assert "molm::linear" in str(info.value)
