// counting_sort and topk_row (csrc/cpu/core/routing_core.h) against naive versions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/core/routing_core.h"

static void test_counting_sort(int64_t m, int64_t n_experts, unsigned seed, bool one_expert) {
  std::mt19937 rng(seed);
  std::vector<int64_t> experts(m);
  for (auto& e : experts) e = one_expert ? n_experts - 1 : static_cast<int64_t>(rng() % n_experts);
  std::vector<int64_t> sorted(m), pos(m), offsets(n_experts + 1);
  molm::core::counting_sort(experts.data(), m, n_experts, sorted.data(), pos.data(), offsets.data());
  // naive: std::stable_sort of slot ids by expert
  std::vector<int64_t> want(m);
  std::iota(want.begin(), want.end(), 0);
  std::stable_sort(want.begin(), want.end(), [&](int64_t a, int64_t b) { return experts[a] < experts[b]; });
  CHECK(sorted == want);
  for (int64_t r = 0; r < m; ++r) CHECK(pos[sorted[r]] == r);
  CHECK(offsets[0] == 0 && offsets[n_experts] == m);
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t count = std::count(experts.begin(), experts.end(), e);
    CHECK(offsets[e + 1] - offsets[e] == count);
  }
}

static void test_topk(int64_t n_experts, int64_t k, unsigned seed, bool ties) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> p(n_experts);
  for (auto& x : p) x = ties ? std::floor(u(rng) * 3.f) : u(rng);
  std::vector<float> gates(k);
  std::vector<int64_t> experts(k);
  molm::core::topk_row(p.data(), n_experts, k, gates.data(), experts.data());
  // naive: sort indices by (value desc, index asc)
  std::vector<int64_t> idx(n_experts);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  for (int64_t j = 0; j < k; ++j) {
    CHECK(experts[j] == idx[j]);
    CHECK(gates[j] == p[idx[j]]);
  }
}

int main() {
  test_counting_sort(0, 4, 1, false);
  test_counting_sort(1, 32, 2, false);
  test_counting_sort(257, 3, 3, false);
  test_counting_sort(1000, 32, 4, true);   // all on one expert, others empty
  test_counting_sort(4096, 257, 5, false);
  for (int64_t k : {1, 2, 4, 8}) {
    test_topk(8, k, 10 + k, false);
    test_topk(8, k, 20 + k, true);
  }
  test_topk(1, 1, 7, false);
  test_topk(257, 3, 8, true);
  TEST_MAIN_RETURN();
}
