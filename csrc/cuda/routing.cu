// CUDA routing: softmax (ATen's, so probs equal torch.softmax bit for bit, as on the CPU), then three kernels
// with no host synchronisation (graph-capturable):
//   1. topk_hist: one thread per token runs core::topk_row (the CPU's code) and a per-chunk expert histogram
//      (chunk = kChunkTokens consecutive tokens = one block; shared-memory integer atomics, order-free).
//   2. scan: one block turns the histogram, laid out [E][chunks], into an exclusive prefix sum. Entry (e, c) is
//      then the first sorted position of chunk c's slots for expert e, and (e, 0) is expert_offsets[e].
//   3. place: one warp per chunk walks its slots in slot order, 32 at a time; lanes with the same expert rank
//      themselves with __match_any_sync, so positions are those of the stable counting sort.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include "../checks.h"
#include "../cpu/core/routing_core.h"
#include "../dispatch.h"
#include "../routing_common.h"
#include "common.cuh"

namespace molm::cuda {
namespace {

constexpr int kChunkTokens = 64;     // tokens per histogram chunk (= threads per topk_hist block)
constexpr int kScanThreads = 1024;   // threads of the single scan block
constexpr int kScanItems = 4;        // items per scan thread per tile
constexpr int64_t kMaxExperts = 8192;  // histogram of one chunk lives in shared memory (E ints)

// probs [N, E] -> gates/experts [N, k]; hist[e * n_chunks + c] = #slots of chunk c routed to e.
template <typename scalar_t>
__global__ void topk_hist_kernel(const scalar_t* __restrict__ probs, int64_t n_tokens, int64_t n_experts, int64_t k,
                                 scalar_t* __restrict__ gates, int64_t* __restrict__ experts,
                                 int* __restrict__ hist, int64_t n_chunks) {
  extern __shared__ int counts[];  // [E]
  const int64_t chunk = blockIdx.x;
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t n = chunk * kChunkTokens + threadIdx.x;
  if (n < n_tokens) {
    core::topk_row(probs + n * n_experts, n_experts, k, gates + n * k, experts + n * k);
    for (int64_t j = 0; j < k; ++j) atomicAdd(&counts[experts[n * k + j]], 1);  // integer: order-free
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) hist[e * n_chunks + chunk] = counts[e];
}

// In place: hist[i] <- sum_{i' < i} hist[i'] over the flat [E][chunks] array; offsets[e] = hist[e * chunks],
// offsets[E] = total. One block, tiles of kScanThreads * kScanItems with a running carry.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(int* __restrict__ hist, int64_t length, int64_t n_chunks,
                                                            int64_t n_experts, int64_t* __restrict__ offsets) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  constexpr int64_t kTile = int64_t(kScanThreads) * kScanItems;
  int carry = 0;
  for (int64_t base = 0; base < length; base += kTile) {
    int items[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t idx = base + int64_t(threadIdx.x) * kScanItems + i;
      items[i] = idx < length ? hist[idx] : 0;
    }
    int tile_total = 0;
    BlockScan(temp).ExclusiveSum(items, items, tile_total);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t idx = base + int64_t(threadIdx.x) * kScanItems + i;
      if (idx < length) hist[idx] = items[i] + carry;
    }
    carry += tile_total;
    __syncthreads();  // temp is reused by the next tile
  }
  __syncthreads();  // all of hist written before the offsets read it
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) offsets[e] = n_chunks > 0 ? hist[e * n_chunks] : 0;
  if (threadIdx.x == 0) offsets[n_experts] = carry;
}

// One warp per chunk: sorted_slots[pos] = s, slot_positions[s] = pos, pos = start(e, chunk) + rank among the
// chunk's earlier slots with expert e. start(e, chunk) lives in hist (owned by this warp alone) and is advanced
// as slots are placed.
__global__ void place_kernel(const int64_t* __restrict__ experts, int64_t m, int64_t k, int* __restrict__ hist,
                             int64_t n_chunks, int64_t* __restrict__ sorted_slots,
                             int64_t* __restrict__ slot_positions) {
  const int64_t chunk = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (chunk >= n_chunks) return;  // whole warps leave together
  const unsigned lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t lo = chunk * kChunkTokens * k, hi = lo + kChunkTokens * k < m ? lo + kChunkTokens * k : m;
  for (int64_t base = lo; base < hi; base += 32) {  // uniform trip count across the warp
    const int64_t s = base + lane;
    const bool valid = s < hi;
    const int64_t e = valid ? experts[s] : -1;  // -1 groups the idle lanes apart from every expert
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (valid) {
      const int64_t pos = hist[e * n_chunks + chunk] + __popc(peers & lanes_below);
      sorted_slots[pos] = s;
      slot_positions[s] = pos;
    }
    __syncwarp();  // every lane has read start(e) before the last peer advances it
    if (valid && (peers >> lane) == 1u) hist[e * n_chunks + chunk] += __popc(peers);  // highest peer lane
    __syncwarp();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_topk_cuda(
    const at::Tensor& logits, int64_t k) {
  check_route_topk(logits, k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), m = n_tokens * k;
  TORCH_CHECK_VALUE(n_experts <= kMaxExperts, "molm::route_topk: the CUDA kernel supports up to ", kMaxExperts,
                    " experts, got E = ", n_experts);
  TORCH_CHECK_VALUE(m < (int64_t(1) << 31), "molm::route_topk: N*k = ", m, " slots exceed the CUDA kernel's 2^31");
  at::Tensor probs, gates, experts, sorted_slots, slot_positions, expert_offsets;
  std::tie(probs, gates, experts, sorted_slots, slot_positions, expert_offsets) = route_outputs(logits, k);
  const int64_t n_chunks = ceil_div(n_tokens, kChunkTokens);
  at::Tensor hist = at::empty({n_experts * n_chunks}, experts.options().dtype(at::kInt));  // [E, chunks]
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n_chunks > 0) {
    MOLM_DISPATCH_FLOATING(logits.scalar_type(), "molm::route_topk", [&] {
      topk_hist_kernel<scalar_t><<<static_cast<unsigned>(n_chunks), kChunkTokens, n_experts * sizeof(int), stream>>>(
          probs.data_ptr<scalar_t>(), n_tokens, n_experts, k, gates.data_ptr<scalar_t>(),
          experts.data_ptr<int64_t>(), hist.data_ptr<int>(), n_chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // also for N = 0: writes expert_offsets = 0
  scan_kernel<<<1, kScanThreads, 0, stream>>>(hist.data_ptr<int>(), hist.numel(), n_chunks, n_experts,
                                              expert_offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n_chunks > 0) {
    constexpr int kWarps = 4;
    place_kernel<<<static_cast<unsigned>(ceil_div(n_chunks, kWarps)), kWarps * 32, 0, stream>>>(
        experts.data_ptr<int64_t>(), m, k, hist.data_ptr<int>(), n_chunks, sorted_slots.data_ptr<int64_t>(),
        slot_positions.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {probs, gates, experts, sorted_slots, slot_positions, expert_offsets};
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) { m.impl("route_topk", &molm::cuda::route_topk_cuda); }
