"""The molm op catalogue: typed wrappers over the `torch.ops.molm.*` kernels of the `molm._C` extension.

Each op has, in this order: a shape helper (shared with the fake, restating the shape relations with
`torch._check`), the wrapper (same signature and outputs as `<name>_ref` in `molm.reference`), its fake (meta)
kernel for `torch.compile`, and its autograd formula. Schemas: `csrc/ops.cpp`; CPU kernels: `csrc/cpu/`.
Shapes: N tokens, k slots, E experts, M = N*k rows, C/D widths, B batch, T new positions, S cached + new.

Importing this module never fails: without the extension `extension_available()` is False and every wrapper
raises a RuntimeError that carries the original import error (see `extension_error()`).
"""

from __future__ import annotations

import contextlib

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.molm.*)

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # the extension is not built; the reference backend still works
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def extension_available() -> bool:
    """True when the compiled kernels (`molm._C`) could be imported."""
    return _C is not None


def extension_error() -> str | None:
    """Why `molm._C` could not be imported (None when it could)."""
    return _IMPORT_ERROR


_SM90_GEMM = {"auto": 0, "on": 1, "off": -1}


def kernel_options() -> dict:
    """The CUDA kernels' path choices now in force (see `set_kernel_options`)."""
    _require_extension()
    raw = _C.kernel_options()
    return {**raw, "sm90_gemm": {v: k for k, v in _SM90_GEMM.items()}[raw["sm90_gemm"]]}


def set_kernel_options(
    *,
    sm90_gemm: str | None = None,
    sb_fused: bool | None = None,
    sb_fused_backward: bool | None = None,
    sb_early_exit: bool | None = None,
    value_checks: bool | None = None,
) -> dict:
    """Choose the CUDA kernel paths (process-wide; returns the previous options, for restoring).

    sm90_gemm: "auto" (the CUTLASS sm_90a grouped GEMM above the GEMV range of 32 rows, on compute capability 9.0
      when built in), "on" (also for small row counts the GEMV declines) or "off" (the WMMA tiles).
    sb_fused: the fused tensor-core stick-breaking prefill (False: the cuBLAS-tiled path).
    sb_fused_backward: the fused tensor-core backward (default False: the cuBLAS-tiled backward, which measured
      about 3x faster on an H200 at B=8, T=2048, D=1024).
    sb_early_exit: the fused prefill stops walking keys once every row's remaining stick is below e^-30.
    value_checks: copy indices and expert offsets to the host and raise the CPU kernels' exact errors (one
      device->host sync per op, so not inside CUDA graphs); off, bad values are made memory-safe instead.
    Each op reads the options when it is called: a captured CUDA graph keeps the paths it was captured with, and
    torch.compile does not see them (set them before compiling).
    """
    previous = kernel_options()
    if sm90_gemm is not None and sm90_gemm not in _SM90_GEMM:
        raise ValueError(f"sm90_gemm must be one of {tuple(_SM90_GEMM)}, got {sm90_gemm!r}")
    new = {
        **previous,
        **{
            k: v
            for k, v in dict(
                sm90_gemm=sm90_gemm,
                sb_fused=sb_fused,
                sb_fused_backward=sb_fused_backward,
                sb_early_exit=sb_early_exit,
                value_checks=value_checks,
            ).items()
            if v is not None
        },
    }
    _C.set_kernel_options(
        _SM90_GEMM[new["sm90_gemm"]],
        bool(new["sb_fused"]),
        bool(new["sb_fused_backward"]),
        bool(new["sb_early_exit"]),
        bool(new["value_checks"]),
    )
    return previous


@contextlib.contextmanager
def kernel_options_scope(**options):
    """`with kernel_options_scope(sb_fused=False): ...` sets options for the block and restores them after."""
    previous = set_kernel_options(**options)
    try:
        yield
    finally:
        set_kernel_options(**previous)


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(
            f"molm extension (molm._C) is not available: {_IMPORT_ERROR}. "
            "Build it with `pip install --no-build-isolation -e .`"
        )


# ---------------------------------------------------------------------------------------------- CPU instruction set
CPU_ISAS = ("scalar", "avx2", "avx512", "avx512_bf16")


def cpu_isa() -> str:
    """The instruction set the CPU kernels' micro-kernels run now, one of `CPU_ISAS` (by default the best the CPU
    supports)."""
    _require_extension()
    return torch.ops.molm_cpu.isa()


def cpu_isas() -> list[str]:
    """The instruction sets of `CPU_ISAS` this CPU supports, in increasing order."""
    _require_extension()
    return list(torch.ops.molm_cpu.supported_isas())


def set_cpu_isa(name: str) -> None:
    """Run the CPU micro-kernels with the bodies for `name` (one of `CPU_ISAS`), for the whole process.

    Results agree across sets within the usual floating-point tolerance and are bitwise repeatable within one.
    Raises ValueError for an unknown name or a set this CPU lacks."""
    _require_extension()
    torch.ops.molm_cpu.set_isa(name)


# ---------------------------------------------------------------------------------------------------- route_topk
def _route_topk_shapes(logits: torch.Tensor, k: int):
    """-> shapes of (probs, gates/experts, sorted_slots/slot_positions, expert_offsets)."""
    torch._check(logits.dim() == 2, lambda: f"route_topk: logits must be [N, E], got {tuple(logits.shape)}")
    n_tokens, n_experts = logits.shape
    torch._check(1 <= k, lambda: f"route_topk: k must be >= 1, got {k}")
    torch._check(k <= n_experts, lambda: f"route_topk: k must be <= E = {n_experts}, got {k}")
    return (n_tokens, n_experts), (n_tokens, k), (n_tokens * k,), (n_experts + 1,)


def route_topk(logits: torch.Tensor, k: int):
    """softmax over E experts, top-k of the probabilities (gate = raw probability), stable sort by expert.

    logits [N, E] -> probs [N, E], gates [N, k] (logits dtype), experts [N, k] int64, sorted_slots [M],
    slot_positions [M], expert_offsets [E+1] (all int64). Probabilities equal torch.softmax bitwise; equal
    probabilities rank the lower expert index first.
    """
    _require_extension()
    return torch.ops.molm.route_topk(logits, k)


if _C is not None:

    @torch.library.register_fake("molm::route_topk")
    def _route_topk_fake(logits, k):
        p_shape, g_shape, m_shape, o_shape = _route_topk_shapes(logits, k)
        return (
            logits.new_empty(p_shape),
            logits.new_empty(g_shape),
            logits.new_empty(g_shape, dtype=torch.int64),
            logits.new_empty(m_shape, dtype=torch.int64),
            logits.new_empty(m_shape, dtype=torch.int64),
            logits.new_empty(o_shape, dtype=torch.int64),
        )

    def _route_topk_setup(ctx, inputs, output):
        probs, _, experts = output[:3]
        ctx.save_for_backward(probs, experts)

    def _route_topk_backward(ctx, d_probs, d_gates, *_int_grads):
        """Gates are gathered probabilities: fold d_gates into d_probs, then the softmax backward."""
        probs, experts = ctx.saved_tensors
        g = torch.zeros_like(probs) if d_probs is None else d_probs
        if d_gates is not None:
            g = g.scatter_add(1, experts, d_gates.to(g.dtype))  # [N, E]
        return torch._softmax_backward_data(g, probs, -1, probs.dtype), None

    torch.library.register_autograd("molm::route_topk", _route_topk_backward, setup_context=_route_topk_setup)


# ---------------------------------------------------------------------------------------------------- gather_rows
def _gather_rows_shape(x: torch.Tensor, index: torch.Tensor, group: int):
    torch._check(x.dim() == 2, lambda: f"gather_rows: x must be [R, C], got {tuple(x.shape)}")
    torch._check(index.dim() == 1, lambda: f"gather_rows: index must be [M], got {tuple(index.shape)}")
    torch._check(group >= 1, lambda: f"gather_rows: group must be >= 1, got {group}")
    return index.shape[0], x.shape[1]


def gather_rows(x: torch.Tensor, index: torch.Tensor, group: int = 1) -> torch.Tensor:
    """out[i] = x[index[i] // group]. x [R, C], index [M] int64 in 0 .. R*group-1 -> [M, C]."""
    _require_extension()
    return torch.ops.molm.gather_rows(x, index, group)


if _C is not None:

    @torch.library.register_fake("molm::gather_rows")
    def _gather_rows_fake(x, index, group):
        return x.new_empty(_gather_rows_shape(x, index, group))

    def _gather_rows_setup(ctx, inputs, output):
        x, index, group = inputs
        ctx.save_for_backward(index)
        ctx.n_rows, ctx.group = x.shape[0], group

    def _gather_rows_backward(ctx, grad):
        """Rows that read the same source row (group > 1: the k slots of a token) sum, in fp32, in index order, so
        the gradient is bitwise repeatable: on CUDA index_put_ with accumulate=True (a stable sort, then serial
        sums; index_add_ would use floating-point atomics), on the CPU index_add_ (one index after the other;
        index_put_ accumulates from several threads at once there).
        """
        (index,) = ctx.saved_tensors
        rows = torch.div(index, ctx.group, rounding_mode="floor")  # [M]
        dx = grad.new_zeros((ctx.n_rows, grad.shape[1]), dtype=torch.promote_types(grad.dtype, torch.float32))
        if dx.is_cuda:
            dx.index_put_((rows,), grad.to(dx.dtype), accumulate=True)
        else:
            dx.index_add_(0, rows, grad.to(dx.dtype))
        return dx.to(grad.dtype), None, None

    torch.library.register_autograd("molm::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup)


# ---------------------------------------------------------------------------------------------------- scatter_ksum
def _scatter_ksum_shape(y: torch.Tensor, gates: torch.Tensor, slot_positions: torch.Tensor):
    torch._check(y.dim() == 2, lambda: f"scatter_ksum: y must be [M, C], got {tuple(y.shape)}")
    torch._check(gates.dim() == 2, lambda: f"scatter_ksum: gates must be [N, k], got {tuple(gates.shape)}")
    torch._check(
        gates.shape[0] * gates.shape[1] == y.shape[0],
        lambda: f"scatter_ksum: gates {tuple(gates.shape)} must have N*k == y.shape[0] = {y.shape[0]}",
    )
    torch._check(
        slot_positions.dim() == 1 and slot_positions.shape[0] == y.shape[0],
        lambda: f"scatter_ksum: slot_positions must be [M = {y.shape[0]}]",
    )
    return gates.shape[0], y.shape[1]


def scatter_ksum(y: torch.Tensor, gates: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j gates[n, j] * y[slot_positions[n*k + j]], in slot order j = 0..k-1, accumulated in fp32.

    y [M, C] expert-sorted, gates [N, k], slot_positions [M] int64 -> [N, C] in y's dtype. No atomics: bitwise
    repeatable.
    """
    _require_extension()
    return torch.ops.molm.scatter_ksum(y, gates, slot_positions)


if _C is not None:

    @torch.library.register_fake("molm::scatter_ksum")
    def _scatter_ksum_fake(y, gates, slot_positions):
        return y.new_empty(_scatter_ksum_shape(y, gates, slot_positions))

    def _scatter_ksum_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _scatter_ksum_backward(ctx, grad):
        """d y[slot_positions[n*k+j]] = gates[n, j] * grad[n];  d gates[n, j] = <grad[n], y[slot_positions[n*k+j]]>."""
        y, gates, slot_positions = ctx.saved_tensors
        n_tokens, k = gates.shape
        acc = torch.promote_types(y.dtype, torch.float32)
        g = grad.to(acc)  # [N, C]
        d_y = d_gates = None
        if ctx.needs_input_grad[0]:
            d_slot = (gates.to(acc)[:, :, None] * g[:, None, :]).reshape(n_tokens * k, -1)  # [M, C] slot order
            d_y = torch.empty_like(d_slot).index_copy_(0, slot_positions, d_slot).to(y.dtype)  # expert-sorted
        if ctx.needs_input_grad[1]:
            rows = y[slot_positions].to(acc).view(n_tokens, k, -1)  # [N, k, C]
            d_gates = (rows * g[:, None, :]).sum(-1).to(gates.dtype)  # [N, k]
        return d_y, d_gates, None

    torch.library.register_autograd("molm::scatter_ksum", _scatter_ksum_backward, setup_context=_scatter_ksum_setup)


# ---------------------------------------------------------------------------------------------------- expert_gemm
def _expert_gemm_shape(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor):
    torch._check(x.dim() == 2, lambda: f"expert_gemm: x must be [M, K], got {tuple(x.shape)}")
    torch._check(weight.dim() == 3, lambda: f"expert_gemm: weight must be [E, K, Nout], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[1] == x.shape[1],
        lambda: f"expert_gemm: weight {tuple(weight.shape)} must have K == x.shape[1] = {x.shape[1]}",
    )
    torch._check(
        expert_offsets.dim() == 1 and expert_offsets.shape[0] == weight.shape[0] + 1,
        lambda: f"expert_gemm: expert_offsets must be [E+1 = {weight.shape[0] + 1}]",
    )
    return x.shape[0], weight.shape[2]


def expert_gemm(
    x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor, activation: str = "none"
) -> torch.Tensor:
    """Grouped GEMM over contiguous expert segments: out[rows of e] = act(x[rows of e] @ weight[e]).

    x [M, K] expert-sorted, weight [E, K, Nout] ([expert, in, out]; a transposed view [E, Nout, K].mT is fine),
    expert_offsets [E+1] int64, activation "none" | "gelu_new" -> [M, Nout].
    """
    _require_extension()
    return torch.ops.molm.expert_gemm(x, weight, expert_offsets, activation)


if _C is not None:

    @torch.library.register_fake("molm::expert_gemm")
    def _expert_gemm_fake(x, weight, expert_offsets, activation):
        torch._check(
            activation in reference.ACTIVATIONS,
            lambda: f"expert_gemm: activation must be one of {reference.ACTIVATIONS}, got {activation!r}",
        )
        return x.new_empty(_expert_gemm_shape(x, weight, expert_offsets))

    @torch.library.register_fake("molm::expert_gemm_wgrad")
    def _expert_gemm_wgrad_fake(x, grad_out, expert_offsets, num_experts):
        torch._check(grad_out.shape[0] == x.shape[0], lambda: "expert_gemm_wgrad: x and grad_out need the same M")
        torch._check(expert_offsets.shape[0] == num_experts + 1, lambda: "expert_gemm_wgrad: offsets must be [E+1]")
        return x.new_empty((num_experts, x.shape[1], grad_out.shape[1]))

    def _expert_gemm_setup(ctx, inputs, output):
        x, weight, expert_offsets, activation = inputs
        ctx.save_for_backward(x, weight, expert_offsets)
        ctx.activation = activation

    def _expert_gemm_backward(ctx, grad):
        """dX = dZ @ W[e]^T per segment (the forward op on transposed weights), dW[e] = X_e^T dZ_e (no atomics);
        for gelu_new the pre-activation Z is recomputed, dZ = gelu_new'(Z) * grad."""
        x, weight, expert_offsets = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.activation == "gelu_new":
            pre = torch.ops.molm.expert_gemm(x, weight, expert_offsets, "none")  # [M, Nout]
            grad = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_x = torch.ops.molm.expert_gemm(grad, weight.transpose(1, 2), expert_offsets, "none")  # [M, K]
        if ctx.needs_input_grad[1]:
            d_w = torch.ops.molm.expert_gemm_wgrad(x, grad, expert_offsets, weight.shape[0])  # [E, K, Nout]
        return d_x, d_w, None, None

    torch.library.register_autograd("molm::expert_gemm", _expert_gemm_backward, setup_context=_expert_gemm_setup)


# ---------------------------------------------------------------------------------------------------- sb_attention
def _sb_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
    torch._check(q.dim() == 5, lambda: f"sb_attention: q must be [B, T, k, H, D], got {tuple(q.shape)}")
    torch._check(k.dim() == 4 and v.dim() == 4, lambda: "sb_attention: k and v must be [B, S, H, D]")
    torch._check(k.shape == v.shape, lambda: f"sb_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(
        k.shape[0] == q.shape[0] and k.shape[2] == q.shape[3] and k.shape[3] == q.shape[4],
        lambda: f"sb_attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, H, D",
    )
    torch._check(q.shape[1] <= k.shape[1], lambda: "sb_attention: q has more positions T than keys S")
    if bias is not None:
        torch._check(
            bias.dim() == 2 and bias.shape[0] == k.shape[0] and bias.shape[1] == k.shape[1],
            lambda: f"sb_attention: bias must be [B, S] = {tuple(k.shape[:2])}",
        )
    return q.shape


def sb_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Fused causal stick-breaking attention (ModuleFormer variant, docs/model.md §3.5), fp32 math for 16-bit inputs.

    q [B, T, k, H, D] (the last T of the S positions), k/v [B, S, H, D], bias [B, S] additive or None
    -> o [B, T, k, H, D] in q's dtype. Never materialises an S x S matrix; decode (T = 1) is O(S * D) per query.
    """
    _require_extension()
    return torch.ops.molm.sb_attention(q, k, v, bias, scale)


if _C is not None:

    @torch.library.register_fake("molm::sb_attention")
    def _sb_attention_fake(q, k, v, bias, scale):
        return q.new_empty(_sb_attention_shape(q, k, v, bias))

    def _sb_attention_setup(ctx, inputs, output):
        q, k, v, bias, scale = inputs
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale

    @torch.library.register_fake("molm::sb_attention_backward")
    def _sb_attention_backward_fake(grad_out, q, k, v, bias, scale, bias_grad):
        _sb_attention_shape(q, k, v, bias)
        torch._check(grad_out.shape == q.shape, lambda: "sb_attention_backward: grad_out must have q's shape")
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        db_shape = tuple(k.shape[:2]) if bias_grad else (0, 0)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(db_shape, dtype=acc)

    def _sb_attention_backward(ctx, grad):
        """One fused kernel (molm::sb_attention_backward): recomputes the weights per query tile, never an S x S
        matrix; dk/dv summed per key block without atomics. K = V passed twice gets dk + dv from autograd."""
        q, k, v, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return None, None, None, None, None
        bias_grad = bias is not None and needs[3]
        dq, dk, dv, dbias = torch.ops.molm.sb_attention_backward(grad.contiguous(), q, k, v, bias, ctx.scale, bias_grad)
        return (
            dq if needs[0] else None,
            dk if needs[1] else None,
            dv if needs[2] else None,
            dbias.to(bias.dtype) if bias_grad else None,
            None,
        )

    torch.library.register_autograd("molm::sb_attention", _sb_attention_backward, setup_context=_sb_attention_setup)


# ---------------------------------------------------------------------------------------------------- linear
def _linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    torch._check(x.dim() == 2, lambda: f"linear: x must be [M, K], got {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"linear: weight must be [N, K], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[1] == x.shape[1],
        lambda: f"linear: weight {tuple(weight.shape)} must have K == x.shape[1] = {x.shape[1]}",
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"linear: bias must be [N = {weight.shape[0]}], got {tuple(bias.shape)}",
        )
    return x.shape[0], weight.shape[0]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """y = act(x @ weight^T + bias) with an nn.Linear weight [N, K]; x [..., K] -> [..., N] in x's dtype;
    activation "none" or "gelu" (nn.GELU's exact GELU of the result in x's dtype, as nn.Linear then nn.GELU).

    On the CPU, decode-sized inputs (at most 16 rows) stream the weight once in its own dtype with fp32
    accumulation (bf16 dot products on CPUs with AVX-512-BF16), each output computed by one thread: results do not
    depend on the thread count or on the other rows.
    """
    _require_extension()
    if x.dim() == 2:  # the routers' rows: no reshape, and the overload itself (called ~100 times per decode step)
        return _linear_op(x, weight, bias, activation)
    lead = x.shape[:-1]
    y = _linear_op(x.reshape(-1, x.shape[-1]), weight, bias, activation)
    return y.view(*lead, weight.shape[0])


if _C is not None:
    _linear_op = torch.ops.molm.linear.default

    @torch.library.register_fake("molm::linear")
    def _linear_fake(x, weight, bias, activation="none"):
        torch._check(
            activation in reference.LINEAR_ACTIVATIONS,
            lambda: f"linear: activation must be one of {reference.LINEAR_ACTIVATIONS}, got {activation!r}",
        )
        return x.new_empty(_linear_shape(x, weight, bias))

    def _linear_setup(ctx, inputs, output):
        x, weight, bias, *rest = inputs
        ctx.activation = rest[0] if rest else "none"
        ctx.save_for_backward(x, weight, bias if ctx.activation != "none" else None)
        ctx.has_bias = bias is not None

    def _linear_backward(ctx, grad):
        """dx = dz @ W, dW = dz^T x, db = sum of dz over rows, with dz = grad through the GELU at the recomputed
        pre-activation (ATen's GEMMs: training shapes, not decode)."""
        x, weight, bias = ctx.saved_tensors
        if ctx.activation == "gelu":
            grad = torch.ops.aten.gelu_backward(grad, torch.nn.functional.linear(x, weight, bias))
        d_x = grad @ weight if ctx.needs_input_grad[0] else None
        d_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        d_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b, None

    torch.library.register_autograd("molm::linear", _linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------------------------------------------- int8 weights
def expert_gemm_q8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, expert_offsets: torch.Tensor, activation: str = "none"
) -> torch.Tensor:
    """expert_gemm with int8 weights and one scale per (expert, output channel): act((x @ qweight[e]^T) * scale[e]).

    x [M, K] expert-sorted, qweight [E, N, K] int8 (each expert's output rows, so a decode step streams contiguous
    rows), scale [E, N], expert_offsets [E+1] -> [M, N] in x's dtype.
    """
    _require_extension()
    return torch.ops.molm.expert_gemm_q8(x, qweight, scale, expert_offsets, activation)


def _float_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The [E, K, Nout] weight in `dtype` that an int8 weight [E, Nout, K] with its scale stands for."""
    if scale is None:
        return weight
    return (weight.float() * scale.float()[:, :, None]).transpose(1, 2).to(dtype)


def linear_q8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear with int8 weights and one scale per output row: (x @ qweight^T) * scale + bias; x [..., K]."""
    _require_extension()
    lead = x.shape[:-1]
    y = torch.ops.molm.linear_q8(x.reshape(-1, x.shape[-1]), qweight, scale, bias)
    return y.view(*lead, qweight.shape[0])


if _C is not None:

    @torch.library.register_fake("molm::expert_gemm_q8")
    def _expert_gemm_q8_fake(x, qweight, scale, expert_offsets, activation):
        torch._check(qweight.dtype == torch.int8, lambda: "expert_gemm_q8: qweight must be int8")
        return x.new_empty(_expert_gemm_shape(x, qweight.transpose(1, 2), expert_offsets))

    @torch.library.register_fake("molm::linear_q8")
    def _linear_q8_fake(x, qweight, scale, bias):
        torch._check(qweight.dtype == torch.int8, lambda: "linear_q8: qweight must be int8")
        return x.new_empty(_linear_shape(x, qweight, bias))

    # Gradients reach the activations (adapters on top of a quantized model train); the int8 weights are buffers.
    def _expert_gemm_q8_setup(ctx, inputs, output):
        x, qweight, scale, expert_offsets, activation = inputs
        ctx.save_for_backward(x, qweight, scale, expert_offsets)
        ctx.activation = activation

    def _expert_gemm_q8_backward(ctx, grad):
        x, qweight, scale, expert_offsets = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("molm: int8 weights cannot be trained; dequantize the model first (molm.dequantize)")
        weight = _float_weight(qweight, scale, x.dtype)  # [E, K, N]
        grad = grad.contiguous()
        if ctx.activation == "gelu_new":
            pre = torch.ops.molm.expert_gemm(x, weight, expert_offsets, "none")
            grad = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        d_x = torch.ops.molm.expert_gemm(grad, weight.transpose(1, 2), expert_offsets, "none")
        return d_x, None, None, None, None

    def _linear_q8_setup(ctx, inputs, output):
        x, qweight, scale, bias = inputs
        ctx.save_for_backward(qweight, scale)
        ctx.has_bias = bias is not None

    def _linear_q8_backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("molm: int8 weights cannot be trained; dequantize the model first (molm.dequantize)")
        d_x = grad @ (qweight.float() * scale.float()[:, None]).to(grad.dtype)
        d_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return d_x, None, None, d_b

    torch.library.register_autograd(
        "molm::expert_gemm_q8", _expert_gemm_q8_backward, setup_context=_expert_gemm_q8_setup
    )
    torch.library.register_autograd("molm::linear_q8", _linear_q8_backward, setup_context=_linear_q8_setup)


# ---------------------------------------------------------------------------------------------------- fused MoE sites
def _moe_weight_out(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, in_features: int, op: str):
    torch._check(weight.dim() == 3, lambda: f"{op}: weight must be 3-d, got {tuple(weight.shape)}")
    if scale is not None:  # int8 [E, Nout, K]
        torch._check(weight.dtype == torch.int8, lambda: f"{op}: a weight with a scale must be int8")
        torch._check(weight.shape[2] == in_features, lambda: f"{op}: int8 weight [E, Nout, K] needs K = {in_features}")
        return weight.shape[1]
    torch._check(weight.shape[1] == in_features, lambda: f"{op}: weight [E, K, Nout] needs K = {in_features}")
    return weight.shape[2]


def moe_map(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
    k: int,
    activation: str = "none",
) -> torch.Tensor:
    """out[s] = act(x[s // k] @ W[e(s)]) for every slot s = n*k + j, in slot order: x [N, K] -> [N*k, Nout].

    weight [E, K, Nout] in x's dtype, or int8 [E, Nout, K] with scale [E, Nout]; sorted_slots, slot_positions,
    expert_offsets as route_topk returns them. No permuted copy of x is made on the decode path.
    """
    _require_extension()
    return torch.ops.molm.moe_map(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation)


def moe_reduce(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    gates: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
) -> torch.Tensor:
    """out[n] = sum_j gates[n, j] * (x[n*k + j] @ W[e(n, j)]): x [N*k, K] in slot order -> [N, Nout]; the k-sum in
    fp32, in slot order."""
    _require_extension()
    return torch.ops.molm.moe_reduce(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets)


def moe_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    scale1: torch.Tensor | None,
    w2: torch.Tensor,
    scale2: torch.Tensor | None,
    gates: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
    activation: str = "gelu_new",
) -> torch.Tensor:
    """A whole MoE MLP, moe_reduce(moe_map(x, w1, k, activation), w2): x [N, C] -> [N, C]. On a CPU, decode-sized
    routings run in one parallel region that streams the chosen experts' two weights once."""
    _require_extension()
    return torch.ops.molm.moe_mlp(
        x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation
    )


def _moe_map_grads(
    x, weight, scale, sorted_slots, slot_positions, offsets, k, activation, grad, need_x, need_w, pre=None
):
    """Gradients of moe_map: dZ = act'(Z) * grad (Z = `pre`, recomputed when not given); dx[n] = sum_j dZ[n*k+j] @
    W[e]^T (a k-sum with unit gates, in fp32); dW[e] = sum over e's slots of x[s // k]^T dZ[s] (expert_gemm_wgrad:
    no atomics)."""
    grad = grad.contiguous()
    if activation == "gelu_new":
        if pre is None:
            pre = torch.ops.molm.moe_map(x, weight, scale, sorted_slots, slot_positions, offsets, k, "none")
        grad = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
    d_x = d_w = None
    if need_x:
        w_t = _float_weight(weight, scale, x.dtype).transpose(1, 2)  # [E, Nout, K]
        ones = grad.new_ones(x.shape[0], k)
        d_x = torch.ops.molm.moe_reduce(grad, w_t, None, ones, sorted_slots, slot_positions, offsets)
    if need_w:
        xs = torch.ops.molm.gather_rows(x, sorted_slots, k)
        gs = torch.ops.molm.gather_rows(grad, sorted_slots, 1)
        d_w = torch.ops.molm.expert_gemm_wgrad(xs, gs, offsets, weight.shape[0])
    return d_x, d_w


def _moe_reduce_grads(x, weight, scale, gates, sorted_slots, slot_positions, offsets, grad, need_x, need_w, need_g):
    """Gradients of moe_reduce: dY[n*k+j] = gates[n, j] * grad[n]; dx = dY @ W[e]^T per slot; dW[e] from e's slots;
    d gates[n, j] = <grad[n], x[n*k+j] @ W[e]> (recomputed), all in fp32 where summed."""
    n_tokens, k = gates.shape
    g = grad.float()
    d_x = d_w = d_g = None
    if need_g:
        y = torch.ops.molm.moe_map(x, weight, scale, sorted_slots, slot_positions, offsets, 1, "none")
        d_g = (y.float().view(n_tokens, k, -1) * g[:, None, :]).sum(-1).to(gates.dtype)
    if need_x or need_w:
        d_y = (gates.float()[:, :, None] * g[:, None, :]).reshape(n_tokens * k, -1).to(x.dtype)  # slot order
        if need_x:
            w_t = _float_weight(weight, scale, x.dtype).transpose(1, 2)
            d_x = torch.ops.molm.moe_map(d_y, w_t, None, sorted_slots, slot_positions, offsets, 1, "none")
        if need_w:
            xs = torch.ops.molm.gather_rows(x, sorted_slots, 1)
            ys = torch.ops.molm.gather_rows(d_y, sorted_slots, 1)
            d_w = torch.ops.molm.expert_gemm_wgrad(xs, ys, offsets, weight.shape[0])
    return d_x, d_w, d_g


def _no_int8_weight_grad(needs_weight_grad: bool, scale) -> None:
    if needs_weight_grad and scale is not None:
        raise RuntimeError("molm: int8 weights cannot be trained; dequantize the model first (molm.dequantize)")


if _C is not None:

    @torch.library.register_fake("molm::moe_map")
    def _moe_map_fake(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation):
        torch._check(
            activation in reference.ACTIVATIONS,
            lambda: f"moe_map: activation must be one of {reference.ACTIVATIONS}, got {activation!r}",
        )
        out = _moe_weight_out(x, weight, scale, x.shape[1], "moe_map")
        return x.new_empty((x.shape[0] * k, out))

    @torch.library.register_fake("molm::moe_reduce")
    def _moe_reduce_fake(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets):
        torch._check(gates.shape[0] * gates.shape[1] == x.shape[0], lambda: "moe_reduce: gates must be [N, k], N*k = M")
        return x.new_empty((gates.shape[0], _moe_weight_out(x, weight, scale, x.shape[1], "moe_reduce")))

    @torch.library.register_fake("molm::moe_mlp")
    def _moe_mlp_fake(x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation):
        hidden = _moe_weight_out(x, w1, scale1, x.shape[1], "moe_mlp")
        torch._check(_moe_weight_out(x, w2, scale2, hidden, "moe_mlp") == x.shape[1], lambda: "moe_mlp: w2 shape")
        return x.new_empty(x.shape)

    def _moe_map_setup(ctx, inputs, output):
        x, weight, scale, sorted_slots, slot_positions, offsets, k, activation = inputs
        ctx.save_for_backward(x, weight, scale, sorted_slots, slot_positions, offsets)
        ctx.k, ctx.activation = k, activation

    def _moe_map_backward(ctx, grad):
        x, weight, scale, sorted_slots, slot_positions, offsets = ctx.saved_tensors
        _no_int8_weight_grad(ctx.needs_input_grad[1] or ctx.needs_input_grad[2], scale)
        d_x, d_w = _moe_map_grads(
            x, weight, scale, sorted_slots, slot_positions, offsets, ctx.k, ctx.activation, grad,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        return d_x, d_w, None, None, None, None, None, None

    def _moe_reduce_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _moe_reduce_backward(ctx, grad):
        x, weight, scale, gates, sorted_slots, slot_positions, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        _no_int8_weight_grad(need[1] or need[2], scale)
        d_x, d_w, d_g = _moe_reduce_grads(
            x, weight, scale, gates, sorted_slots, slot_positions, offsets, grad, need[0], need[1], need[3]
        )
        return d_x, d_w, None, d_g, None, None, None

    def _moe_mlp_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:-1])
        ctx.activation = inputs[-1]

    def _moe_mlp_backward(ctx, grad):
        """Through the hidden activations h = act(Z), Z = moe_map(x, w1, k), recomputed (not kept from the forward)."""
        x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        _no_int8_weight_grad(need[1] or need[2], scale1)
        _no_int8_weight_grad(need[3] or need[4], scale2)
        k = gates.shape[1]
        routing = (sorted_slots, slot_positions, offsets)
        pre = torch.ops.molm.moe_map(x, w1, scale1, *routing, k, "none")  # [M, F] slot order
        h = torch.ops.aten.gelu(pre, approximate="tanh") if ctx.activation == "gelu_new" else pre
        d_h, d_w2, d_g = _moe_reduce_grads(h, w2, scale2, gates, *routing, grad, need[0] or need[1], need[3], need[5])
        d_x = d_w1 = None
        if d_h is not None:
            d_x, d_w1 = _moe_map_grads(x, w1, scale1, *routing, k, ctx.activation, d_h, need[0], need[1], pre)
        return d_x, d_w1, None, d_w2, None, d_g, None, None, None, None

    torch.library.register_autograd("molm::moe_map", _moe_map_backward, setup_context=_moe_map_setup)
    torch.library.register_autograd("molm::moe_reduce", _moe_reduce_backward, setup_context=_moe_reduce_setup)
    torch.library.register_autograd("molm::moe_mlp", _moe_mlp_backward, setup_context=_moe_mlp_setup)
