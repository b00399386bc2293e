// Hopper grouped expert GEMM: one CUTLASS 3.x ptr-array grouped GEMM (TMA loads, wgmma, warp-specialised
// cooperative schedule, persistent tile scheduler) over all experts, bf16/fp16 in, fp32 accumulation, gelu_new
// fused into the epilogue for the up projection.
//
// Problem sizes stay on the device: a one-block setup kernel reads expert_offsets and writes, per expert e, the
// shape (M_e, N, K), the pointers x + lo_e*K, weight[e], out + lo_e*N and the strides; the GEMM is then launched
// with problem_count = E (known on the host) and no host copy of the shapes. Nothing syncs with the host, so the
// pair can be captured in a CUDA graph. Empty experts are groups with no tiles.
//
// Layouts: x is [M, K] row-major (A K-major, CUTLASS "RowMajor"), weight[e] is [K, N] with N contiguous (B
// N-major, CUTLASS "RowMajor" B), out is [M, N] row-major. wgmma reads 16-bit B in either major order from shared
// memory (the TMA copy keeps the global layout), so no transpose or swapped Dᵀ = Wᵀxᵀ formulation is needed.
//
// The device code only exists for sm_90a: CUTLASS's kernel body is guarded by __CUDA_ARCH_FEAT_SM90_ALL (other
// archs get a stub that prints an error), and the host only calls this on compute capability 9.x. Without CUTLASS
// (MOLM_WITH_CUTLASS undefined) this file compiles to a function that always declines.
// Device asserts are calls; a call between wgmma issue and wait serialises the wgmma pipeline (ptxas C7510), and
// torch's nvcc flags do not define NDEBUG. So this TU drops them.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "expert_gemm_sm90.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <cstdint>

#include "device.cuh"

#if defined(MOLM_WITH_CUTLASS)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

namespace molm::cuda {

#if defined(MOLM_WITH_CUTLASS) && defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
namespace {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per expert

// Element: cutlass::bfloat16_t or cutlass::half_t; Gelu: fuse gelu_new (CUTLASS's GELU_taylor is the same tanh
// formula, with the hardware tanh approximation).
template <typename Element, bool Gelu>
struct Sm90Gemm {
  using Layout = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes: TMA's minimum
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = std::conditional_t<
      Gelu,
      cutlass::epilogue::fusion::LinCombEltAct<cutlass::epilogue::thread::GELU_taylor, Element, float, void, float>,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>;
  // C is void: no source operand is read (beta = 0).
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, Layout*, kAlign, Element, Layout*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, Layout*, kAlign, Element, Layout*, kAlign, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

template <typename G>
struct GroupArrays {  // per-expert arguments, filled on the device
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const typename G::Gemm::ElementA** a;
  const typename G::Gemm::ElementB** b;
  typename G::Gemm::ElementD** d;
  typename G::StrideA* sa;
  typename G::StrideB* sb;
  typename G::StrideD* sd;
};

// One thread per expert. Offsets are clamped to [0, M] like the other expert_gemm kernels (memory-safe without
// value checks).
template <typename G, typename E>
__global__ void setup_groups_kernel(const E* x, const E* w, int64_t ws0, E* out, const int64_t* offsets, int n_experts,
                                    int64_t m, int n, int k, typename G::StrideA sa, typename G::StrideB sb,
                                    typename G::StrideD sd, GroupArrays<G> g) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n_experts) return;
  int64_t lo = offsets[e], hi = offsets[e + 1];
  lo = lo < 0 ? 0 : (lo > m ? m : lo);
  hi = hi < lo ? lo : (hi > m ? m : hi);
  g.shapes[e] = cute::make_shape(static_cast<int>(hi - lo), n, k);
  g.a[e] = x + lo * k;
  g.b[e] = w + e * ws0;
  g.d[e] = out + lo * n;
  g.sa[e] = sa;
  g.sb[e] = sb;
  g.sd[e] = sd;
}

template <typename T>
T* align_up(uint8_t*& cursor, int64_t count) {  // carve count Ts out of a byte buffer, 16-byte aligned
  auto p = reinterpret_cast<uintptr_t>(cursor);
  p = (p + 15) & ~uintptr_t(15);
  cursor = reinterpret_cast<uint8_t*>(p + sizeof(T) * count);
  return reinterpret_cast<T*>(p);
}

// The GEMM kernel's dynamic shared-memory limit, raised once per device: Gemm::initialize would repeat this host call
// on every call (and so also during graph capture).
template <typename Gemm>
void raise_smem_limit_once(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> raised[kMaxDevices] = {};
  if (device < kMaxDevices && raised[device].load()) return;
  constexpr int smem = Gemm::GemmKernel::SharedStorageSize;
  if constexpr (smem >= (48 << 10))
    C10_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<typename Gemm::GemmKernel>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  if (device < kMaxDevices) raised[device].store(true);
}

template <typename G>
bool run_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets, at::Tensor& out) {
  using Gemm = typename G::Gemm;
  using E = typename Gemm::ElementA;
  const int64_t m = x.size(0);
  const int k = static_cast<int>(x.size(1)), n = static_cast<int>(weight.size(2));
  const int n_experts = static_cast<int>(weight.size(0));
  const auto stream = at::cuda::getCurrentCUDAStream();

  cutlass::KernelHardwareInfo hw;
  hw.device_id = x.get_device();
  hw.sm_count = at::cuda::getDeviceProperties(hw.device_id)->multiProcessorCount;

  // The per-expert arrays are filled on the device (below); the checks and the workspace size depend on the group
  // count and the device only, not on where the arrays live.
  GroupArrays<G> g{};
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {n_experts, nullptr, nullptr},  // no host copy of the problem shapes
                                {nullptr, nullptr, nullptr, nullptr},
                                {{}, nullptr, nullptr, nullptr, nullptr},
                                hw};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;

  // One allocation (from the caching allocator: no cudaMalloc once warm, none in graph capture) for CUTLASS's
  // workspace and the per-expert arrays: shapes, 3 pointers and 3 strides each, plus alignment slack.
  const int64_t workspace_bytes = (static_cast<int64_t>(Gemm::get_workspace_size(args)) + 127) / 128 * 128;
  const int64_t array_bytes =
      n_experts * int64_t(sizeof(typename ProblemShape::UnderlyingProblemShape) + 3 * sizeof(void*) +
                          sizeof(typename G::StrideA) + sizeof(typename G::StrideB) + sizeof(typename G::StrideD)) +
      7 * 16;
  at::Tensor buffer = at::empty({workspace_bytes + array_bytes}, x.options().dtype(at::kByte));
  uint8_t* workspace = buffer.data_ptr<uint8_t>();
  uint8_t* cursor = workspace + workspace_bytes;
  g.shapes = align_up<typename ProblemShape::UnderlyingProblemShape>(cursor, n_experts);
  g.a = align_up<const E*>(cursor, n_experts);
  g.b = align_up<const E*>(cursor, n_experts);
  g.d = align_up<E*>(cursor, n_experts);
  g.sa = align_up<typename G::StrideA>(cursor, n_experts);
  g.sb = align_up<typename G::StrideB>(cursor, n_experts);
  g.sd = align_up<typename G::StrideD>(cursor, n_experts);
  args.problem_shape.problem_shapes = g.shapes;
  args.mainloop = {g.a, g.sa, g.b, g.sb};
  args.epilogue.ptr_D = g.d;
  args.epilogue.dD = g.sd;

  // Strides are the same for every expert (only the pointers and M_e differ); the batch extent is 1.
  const auto sa = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(1, k, 1));
  const auto sb = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(n, k, 1));
  const auto sd = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(1, n, 1));
  setup_groups_kernel<G, E><<<(n_experts + 127) / 128, 128, 0, stream>>>(
      reinterpret_cast<const E*>(x.data_ptr()), reinterpret_cast<const E*>(weight.data_ptr()), weight.stride(0),
      reinterpret_cast<E*>(out.data_ptr()), offsets.data_ptr<int64_t>(), n_experts, m, n, k, sa, sb, sd, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // What Gemm::initialize does, less the shared-memory attribute (once per device): the workspace (stream-ordered)
  // and the kernel parameters, which hold this call's pointers and so are built per call.
  raise_smem_limit_once<Gemm>(hw.device_id);
  Gemm gemm;
  TORCH_CHECK(Gemm::GemmKernel::initialize_workspace(args, workspace, stream) == cutlass::Status::kSuccess &&
                  gemm.update(args, workspace) == cutlass::Status::kSuccess,
              "molm::expert_gemm: CUTLASS sm90 grouped GEMM failed to initialise");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess,
              "molm::expert_gemm: CUTLASS sm90 grouped GEMM failed to launch");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

bool expert_gemm_sm90(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets, bool gelu,
                      at::Tensor& out) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(2);
  // TMA: 16-byte aligned bases and row pitches; dense rows (the setup kernel assumes ld = K for x, N for weight).
  const bool layout_ok = x.stride(1) == 1 && x.stride(0) == k && weight.stride(2) == 1 && weight.stride(1) == n &&
                         weight.stride(0) % 8 == 0 && k % 8 == 0 && n % 8 == 0 && out.is_contiguous() &&
                         aligned16(x.data_ptr()) && aligned16(weight.data_ptr()) && aligned16(out.data_ptr());
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;  // CUTLASS problem shapes are int
  if (!layout_ok || weight.size(0) == 0 || m > kIntMax || k > kIntMax || n > kIntMax) return false;
  if (dtype == at::kBFloat16) {
    return gelu ? run_grouped<Sm90Gemm<cutlass::bfloat16_t, true>>(x, weight, expert_offsets, out)
                : run_grouped<Sm90Gemm<cutlass::bfloat16_t, false>>(x, weight, expert_offsets, out);
  }
  return gelu ? run_grouped<Sm90Gemm<cutlass::half_t, true>>(x, weight, expert_offsets, out)
              : run_grouped<Sm90Gemm<cutlass::half_t, false>>(x, weight, expert_offsets, out);
}

#else  // built without CUTLASS (or with a CUDA older than 12.3): the WMMA tiles serve Hopper too

bool expert_gemm_sm90(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, at::Tensor&) { return false; }

#endif

}  // namespace molm::cuda
