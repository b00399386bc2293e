// Routing kernels after the softmax, free of ATen so that the CPU emulator (tests/cuda_emu/) runs them in
// tests/test_routing_emu.py. Three kernels with no host synchronisation (graph-capturable):
//   1. topk_hist: one thread per token runs core::topk_row (the CPU's code) and a per-chunk expert histogram
//      (chunk = kChunkTokens consecutive tokens = one block; shared-memory integer atomics, order-free).
//   2. scan: one block turns the histogram, laid out [E][chunks], into an exclusive prefix sum. Entry (e, c) is
//      then the first sorted position of chunk c's slots for expert e, and (e, 0) is expert_offsets[e].
//   3. place: one warp per chunk walks its slots in slot order, 32 at a time; lanes with the same expert rank
//      themselves with __match_any_sync, so positions are those of the stable counting sort.
// All sums are of integers, so every result is exact and independent of the order of the additions.
#pragma once

#include <cstdint>

#include "../cpu/core/routing_core.h"
#include "device.cuh"

namespace molm::cuda::routing {

constexpr int kChunkTokens = 64;    // tokens per histogram chunk (= threads per topk_hist block)
constexpr int kScanThreads = 1024;  // threads of the single scan block
constexpr int kScanItems = 4;       // items per scan thread per tile
constexpr int kScanWarps = kScanThreads / 32;
constexpr int64_t kMaxExperts = 8192;  // histogram of one chunk lives in shared memory (E ints)
constexpr int kPlaceWarps = 4;         // chunks per place block

// probs [N, E] -> gates/experts [N, k]; hist[e * n_chunks + c] = #slots of chunk c routed to e. T: the element type
// with a conversion to float (c10's types on the GPU). Dynamic shared memory: E ints.
template <typename T>
__global__ void topk_hist_kernel(const T* __restrict__ probs, int64_t n_tokens, int64_t n_experts, int64_t k,
                                 T* __restrict__ gates, int64_t* __restrict__ experts, int* __restrict__ hist,
                                 int64_t n_chunks) {
  MOLM_CUDA_SMEM(smem);
  int* counts = reinterpret_cast<int*>(smem);  // [E]
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

// Exclusive sum of the block's items in thread order (thread t's items follow thread t-1's); returns the block
// total. warp_sums: kScanWarps ints of shared memory, free again once every thread has returned and synchronised.
__device__ __forceinline__ int block_exclusive_sum(int (&items)[kScanItems], int* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int own = 0;  // exclusive within the thread
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int v = items[i];
    items[i] = own;
    own += v;
  }
  const int incl = dev::warp_prefix_sum(own, lane);  // inclusive within the warp
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) warp_sums[lane] = dev::warp_prefix_sum(lane < kScanWarps ? warp_sums[lane] : 0, lane);
  __syncthreads();
  const int before = (warp > 0 ? warp_sums[warp - 1] : 0) + incl - own;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) items[i] += before;
  return warp_sums[kScanWarps - 1];
}

// In place: hist[i] <- sum_{i' < i} hist[i'] over the flat [E][chunks] array; offsets[e] = hist[e * chunks],
// offsets[E] = total. One block of kScanThreads, tiles of kScanThreads * kScanItems with a running carry. Dynamic
// shared memory: kScanWarps ints.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(int* __restrict__ hist, int64_t length, int64_t n_chunks,
                                                            int64_t n_experts, int64_t* __restrict__ offsets) {
  MOLM_CUDA_SMEM(smem);
  int* warp_sums = reinterpret_cast<int*>(smem);
  constexpr int64_t kTile = int64_t(kScanThreads) * kScanItems;
  int carry = 0;
  for (int64_t base = 0; base < length; base += kTile) {
    int items[kScanItems];
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t idx = base + int64_t(threadIdx.x) * kScanItems + i;
      items[i] = idx < length ? hist[idx] : 0;
    }
    const int tile_total = block_exclusive_sum(items, warp_sums);
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int64_t idx = base + int64_t(threadIdx.x) * kScanItems + i;
      if (idx < length) hist[idx] = items[i] + carry;
    }
    carry += tile_total;
    __syncthreads();  // warp_sums is reused by the next tile
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

inline int64_t hist_elems(int64_t n_tokens, int64_t n_experts) { return n_experts * ceil_div(n_tokens, kChunkTokens); }

// probs [N, E] contiguous -> gates, experts [N, k], sorted_slots, slot_positions [N * k], expert_offsets [E + 1];
// hist: hist_elems(N, E) ints of workspace. E <= kMaxExperts, N * k < 2^31 (the caller checks).
template <typename T>
void launch_route(const T* probs, int64_t n_tokens, int64_t n_experts, int64_t k, T* gates, int64_t* experts, int* hist,
                  int64_t* sorted_slots, int64_t* slot_positions, int64_t* expert_offsets, stream_t stream) {
  const int64_t n_chunks = ceil_div(n_tokens, kChunkTokens);
  if (n_chunks > 0)
    MOLM_CUDA_LAUNCH(topk_hist_kernel<T>, dim3(static_cast<unsigned>(n_chunks)), dim3(kChunkTokens),
                     static_cast<size_t>(n_experts * sizeof(int)), stream, probs, n_tokens, n_experts, k, gates,
                     experts, hist, n_chunks);
  // also for N = 0: writes expert_offsets = 0
  MOLM_CUDA_LAUNCH(scan_kernel, dim3(1), dim3(kScanThreads), sizeof(int) * kScanWarps, stream, hist,
                   n_experts * n_chunks, n_chunks, n_experts, expert_offsets);
  if (n_chunks > 0)
    MOLM_CUDA_LAUNCH(place_kernel, dim3(static_cast<unsigned>(ceil_div(n_chunks, kPlaceWarps))), dim3(kPlaceWarps * 32),
                     size_t(0), stream, static_cast<const int64_t*>(experts), n_tokens * k, k, hist, n_chunks,
                     sorted_slots, slot_positions);
}

}  // namespace molm::cuda::routing
