"""int8 weight-only quantization: the two int8 ops against their fp32 references, the quantizer's math, a quantized
model against the float one and across save/load, both backends, and every refusal."""

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import molm
from molm import ops, reference
from molm.quantization import QMAX, quantize_tensor

from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="molm._C not built")
DATA = os.path.join(os.path.dirname(__file__), "data")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _experts(rows, k, n, dtype, seed=0):
    x = torch.randn(sum(rows), k, generator=_gen(seed)).to(dtype)
    q = torch.randint(-QMAX, QMAX + 1, (len(rows), n, k), generator=_gen(seed + 1), dtype=torch.int8)  # rows
    scale = torch.rand(len(rows), n, generator=_gen(seed + 2)) * 0.02 + 1e-3
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    return x, q, scale, offsets


# ------------------------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize(
    "rows,k,n",
    [
        ([1, 0, 1], 64, 128),
        ([2, 3], 33, 70),
        ([0, 16, 1], 128, 64),
        ([40, 0, 5], 48, 96),
        ([1], 7, 1),
        ([4] * 8, 256, 200),
    ],
)
def test_expert_gemm_q8_matches_reference(rows, k, n, activation, dtype):
    x, q, scale, offsets = _experts(rows, k, n, dtype)
    out = ops.expert_gemm_q8(x, q, scale, offsets, activation)
    exact = reference.expert_gemm_ref(
        x.double(), (q.double() * scale.double()[:, :, None]).transpose(1, 2), offsets, activation
    )
    lowp = reference.expert_gemm_q8_ref(x, q, scale, offsets, activation)
    assert out.dtype == dtype and out.shape == (sum(rows), n)
    assert_close(out, exact, lowp, dtype, f"expert_gemm_q8 {dtype} rows={rows}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1024, 515), (3, 31, 9), (16, 64, 64), (17, 64, 40), (40, 100, 4099)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_q8_matches_reference(m, k, n, bias, dtype):
    x = torch.randn(m, k, generator=_gen()).to(dtype)
    q = torch.randint(-QMAX, QMAX + 1, (n, k), generator=_gen(1), dtype=torch.int8)
    scale = torch.rand(n, generator=_gen(2)) * 0.02 + 1e-3
    b = torch.randn(n, generator=_gen(3)).to(dtype) if bias else None
    out = ops.linear_q8(x, q, scale, b)
    exact = reference.linear_ref(x.double(), q.double() * scale.double()[:, None], None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, exact, reference.linear_q8_ref(x, q, scale, b), dtype, f"linear_q8 {dtype} m={m}")


def test_int8_ops_are_independent_of_threads_and_of_other_rows():
    x, q, scale, offsets = _experts([3, 1, 4], 128, 192, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.expert_gemm_q8(x, q, scale, offsets, "gelu_new")
        lin_one = ops.linear_q8(x, q[0], scale[0])
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, ops.expert_gemm_q8(x, q, scale, offsets, "gelu_new"))
        assert torch.equal(lin_one, ops.linear_q8(x, q[0], scale[0]))
    finally:
        torch.set_num_threads(threads)
    alone = ops.expert_gemm_q8(x[3:4], q, scale, torch.tensor([0, 0, 1, 1]), "gelu_new")
    assert torch.equal(alone, one[3:4])


def test_int8_ops_schema_fakes_and_activation_gradients():
    x, q, scale, offsets = _experts([2, 1], 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.molm.expert_gemm_q8.default, (x, q, scale, offsets, "gelu_new"))
    torch.library.opcheck(torch.ops.molm.linear_q8.default, (x, q[0], scale[0], None))
    for activation in ("none", "gelu_new"):
        xr = x.clone().requires_grad_(True)
        grad = torch.randn(3, 8, generator=_gen(5))
        got = torch.autograd.grad(ops.expert_gemm_q8(xr, q, scale, offsets, activation), xr, grad)[0]
        want = torch.autograd.grad(reference.expert_gemm_q8_ref(xr, q, scale, offsets, activation), xr, grad)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(
        lambda x: ops.expert_gemm_q8(x, q, scale, offsets, "none"), backend="eager", fullgraph=True
    )
    torch.testing.assert_close(compiled(x), ops.expert_gemm_q8(x, q, scale, offsets, "none"))


@pytest.mark.parametrize(
    "make,exc,needle",
    [
        (
            lambda: (torch.randn(2, 8), torch.zeros(1, 4, 8), torch.ones(1, 4), torch.tensor([0, 2]), "none"),
            TypeError,
            "qweight must be int8",
        ),
        (
            lambda: (
                torch.randn(2, 8),
                torch.zeros(1, 4, 8, dtype=torch.int8),
                torch.ones(4),
                torch.tensor([0, 2]),
                "none",
            ),
            ValueError,
            "scale must be [E, N] = [1, 4]",
        ),
        (
            lambda: (
                torch.randn(2, 8),
                torch.zeros(1, 4, 7, dtype=torch.int8),
                torch.ones(1, 4),
                torch.tensor([0, 2]),
                "none",
            ),
            ValueError,
            "must have K == x.size(1) = 8",
        ),
    ],
)
def test_expert_gemm_q8_bad_inputs(make, exc, needle):
    with pytest.raises(exc, match=re.escape(needle)):
        torch.ops.molm.expert_gemm_q8(*make())


# ------------------------------------------------------------------------------------------------------ quantizer
def test_quantize_tensor_is_symmetric_per_output_channel():
    w = torch.randn(3, 40, 24, generator=_gen())
    w[1, :, 5] = 0.0  # an all-zero channel
    q, scale = quantize_tensor(w, reduce_dim=1)
    assert q.dtype == torch.int8 and scale.shape == (3, 24) and int(q.abs().max()) == QMAX
    torch.testing.assert_close(scale[0], w[0].abs().amax(0) / QMAX)
    assert scale[1, 5] == 1.0 and not q[1, :, 5].any()
    assert bool(((q.float() * scale[:, None, :] - w).abs() <= scale[:, None, :] / 2 + 1e-7).all())


# ------------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def float_model():
    return molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32)


def _ids():
    return torch.randint(0, 512, (2, 24), generator=_gen(7))


def test_quantized_model_is_close_to_the_float_model_on_both_backends(float_model):
    q = molm.quantize(copy.deepcopy(float_model))
    assert type(q.lm_head).__name__ == "QuantizedLinear" and q.config.quantization["method"] == "int8"
    experts = q.transformer.h[0].mlpf.experts
    assert experts.weight.dtype == torch.int8 and experts.weight.shape == (8, 128, 64)  # [E, out, in]
    with torch.no_grad():
        want = float_model(_ids()).logits
        got = q(_ids()).logits
        ref = copy.deepcopy(q).set_backend("reference")(_ids()).logits
    # int8 rounding moves every logit a little; a router near-tie may flip an expert at a rare position (as bf16
    # against fp32 does), so the bound is on the typical position
    per_position = (got - want).abs().amax(-1)
    assert (
        per_position.median() < 0.01 * want.abs().max()
        and (per_position < 0.02 * want.abs().max()).float().mean() > 0.9
    )
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the kernels compute what the reference does
    prompt = _ids()[:1, :6]
    assert torch.equal(
        molm.generate(q, prompt, max_new_tokens=12), molm.generate(float_model, prompt, max_new_tokens=12)
    )


def test_quantized_checkpoint_round_trip_and_load_time_quantization(float_model, tmp_path):
    q = molm.quantize(copy.deepcopy(float_model))
    q.save_pretrained(tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization"]["method"] == "int8"
    state = load_file(tmp_path / "int8" / "model.safetensors")
    assert state["lm_head.weight"].dtype == torch.int8 and state["lm_head.weight_scale"].dtype == torch.float32
    back = molm.load(tmp_path / "int8")
    at_load = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, quantize="int8")
    with torch.no_grad():
        logits = q(_ids()).logits
        assert torch.equal(back(_ids()).logits, logits)
        assert torch.equal(at_load(_ids()).logits, logits)


def test_scales_stay_fp32_when_the_model_changes_dtype(float_model):
    q = molm.quantize(copy.deepcopy(float_model)).to(torch.bfloat16)
    assert q.lm_head.weight_scale.dtype == torch.float32 and q.lm_head.weight.dtype == torch.int8
    assert q.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(q.lm_head.weight_scale, molm.quantize(copy.deepcopy(float_model)).lm_head.weight_scale)


def test_dequantize_gives_a_trainable_float_model(float_model):
    q = molm.quantize(copy.deepcopy(float_model))
    d = molm.dequantize(copy.deepcopy(q))
    assert d.lm_head.weight.dtype == torch.float32 and d.config.quantization is None
    with torch.no_grad():
        torch.testing.assert_close(d(_ids()).logits, q(_ids()).logits, rtol=1e-4, atol=1e-4)
    molm.train(d, _ids().flatten().repeat(8), steps=1, seq_len=8, batch_size=2, progress=False, eval_every=0)


def test_bad_quantization_requests_name_the_problem(float_model, tmp_path):
    q = molm.quantize(copy.deepcopy(float_model))
    with pytest.raises(ValueError, match="already quantized"):
        molm.quantize(q)
    with pytest.raises(ValueError, match="unknown quantization method 'int4'"):
        molm.quantize(copy.deepcopy(float_model), "int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        molm.load(os.path.join(DATA, "molm-tiny-a"), quantize="fp8")
    for what, call in (
        ("training", lambda: molm.train(q, _ids().flatten(), steps=1, seq_len=8, progress=False)),
        ("molm.extend", lambda: molm.extend(q, new_mlp_experts=1)),
        ("molm.prune", lambda: molm.prune(q, None, keep=2)),
    ):
        with pytest.raises(ValueError, match=f"{re.escape(what)} needs float weights.*molm.dequantize"):
            call()
    q.save_pretrained(tmp_path / "int8")
    with pytest.raises(molm.CheckpointError, match="already quantized"):
        molm.load(tmp_path / "int8", quantize="int8")
    path = tmp_path / "int8" / "model.safetensors"
    state = load_file(path)
    scale = state.pop("transformer.h.0.mlpf.experts.weight_scale")
    save_file(state, path)
    with pytest.raises(molm.CheckpointError, match=r"missing.*transformer\.h\.0\.mlpf\.experts\.weight_scale"):
        molm.load(tmp_path / "int8")
    state["transformer.h.0.mlpf.experts.weight_scale"] = scale[:, :5].contiguous()
    save_file(state, path)
    with pytest.raises(molm.CheckpointError, match=r"mis-shaped.*weight_scale"):
        molm.load(tmp_path / "int8")
    cfg = json.loads((tmp_path / "int8" / "config.json").read_text())
    cfg["quantization"] = {"method": "int3"}
    (tmp_path / "int8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(molm.CheckpointError, match="unknown quantization"):
        molm.load(tmp_path / "int8")


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_quantize_info_and_generate(tmp_path, capsys):
    from molm.cli import DEFAULT_MODEL, main

    out = tmp_path / "int8"
    assert main(["quantize", DEFAULT_MODEL, str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "quantization: int8 experts and lm_head" in capsys.readouterr().out
    prompt = ["generate", "ROMEO.", "--max-new-tokens", "16"]
    assert main(prompt + ["--model", str(out)]) == 0
    from_file = capsys.readouterr().out
    assert main(prompt + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out == from_file  # quantizing at load time gives the saved int8 model's tokens
    assert main(["quantize", str(out), str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "already quantized" in err and len(err.strip().splitlines()) == 1
