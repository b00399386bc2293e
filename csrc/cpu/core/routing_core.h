// Torch-free routing math: top-k selection of one row and the stable counting sort of (token, slot) pairs by expert.
// Tested directly in tests/cpp/test_routing.cpp. ranks_before and topk_row are also compiled for the GPU
// (csrc/cuda/routing.cu runs topk_row once per token), so they avoid the standard library.
#pragma once

#include <cstdint>
#include <vector>

#include "host_device.h"

namespace molm::core {

// a ranks before b: larger value first; NaN counts as the largest value (torch.topk does the same).
// (x != x) is the NaN test that works on host and device alike.
MOLM_HOST_DEVICE inline bool ranks_before(float a, float b) {
  if (a != a) return b == b;
  if (b != b) return false;
  return a > b;
}

// Top-k of one row p[0..E): gates[j] = p[experts[j]], descending; equal values keep the lower expert index first.
// O(k * E), which beats a heap for the k <= 8 the models use.
template <typename T>
MOLM_HOST_DEVICE void topk_row(const T* p, int64_t n_experts, int64_t k, T* gates, int64_t* experts) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float best_v = 0.f;
    for (int64_t e = 0; e < n_experts; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= experts[i] == e;
      if (taken) continue;
      const float v = static_cast<float>(p[e]);
      if (best < 0 || ranks_before(v, best_v)) {
        best = e;
        best_v = v;
      }
    }
    experts[j] = best;
    gates[j] = p[best];
  }
}

// Stable counting sort of the M = N*k slot ids by expert id (each in [0, E)).
// sorted_slots[r] = slot at sorted position r (ties by slot id), slot_positions = inverse permutation,
// offsets[E+1] = exclusive prefix sum of the per-expert counts.
inline void counting_sort(const int64_t* experts, int64_t m, int64_t n_experts, int64_t* sorted_slots,
                          int64_t* slot_positions, int64_t* offsets) {
  for (int64_t e = 0; e <= n_experts; ++e) offsets[e] = 0;
  for (int64_t s = 0; s < m; ++s) ++offsets[experts[s] + 1];
  for (int64_t e = 0; e < n_experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> next(offsets, offsets + n_experts);
  for (int64_t s = 0; s < m; ++s) {
    const int64_t r = next[experts[s]]++;
    sorted_slots[r] = s;
    slot_positions[s] = r;
  }
}

}  // namespace molm::core
