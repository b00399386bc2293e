// sb_terms / sb_scan_row / sb_combine_chunks (csrc/cpu/core/sb_core.h) against a naive double-precision loop
// that follows the definition A_j = sigmoid(l_j) * prod_{j<m<=i} (1 - sigmoid(l_m)).
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/core/sb_core.h"

static std::vector<double> naive_weights(const std::vector<double>& l, int64_t i) {
  std::vector<double> a(l.size(), 0.0);
  for (int64_t j = 0; j <= i; ++j) {
    double w = 1.0 / (1.0 + std::exp(-l[j]));
    for (int64_t m = j + 1; m <= i; ++m) w *= 1.0 - 1.0 / (1.0 + std::exp(-l[m]));
    a[j] = w;
  }
  return a;
}

static void test_scan(int64_t width, int64_t i, unsigned seed, bool masked) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 2.0);
  std::vector<double> raw(width), bias(width, 0.0), logit(width);
  for (int64_t j = 0; j < width; ++j) {
    raw[j] = nd(rng);
    if (masked && j % 3 == 0) bias[j] = -std::numeric_limits<float>::max();
  }
  const double scale = 0.7;
  for (int64_t j = 0; j < width; ++j) logit[j] = raw[j] * scale + bias[j];
  const std::vector<double> want = naive_weights(logit, i);
  std::vector<float> got(raw.begin(), raw.end());
  std::vector<float> bias_f(bias.begin(), bias.end());
  const float total = molm::core::sb_scan_row<float>(got.data(), i, width, static_cast<float>(scale), bias_f.data());
  double total_want = 0.0;
  for (int64_t m = 0; m <= i; ++m) total_want += std::log1p(-1.0 / (1.0 + std::exp(-logit[m])));
  for (int64_t j = 0; j < width; ++j) {
    CHECK(std::abs(got[j] - want[j]) <= 1e-5);
    if (j > i || (masked && j % 3 == 0)) CHECK(got[j] == 0.f);
  }
  CHECK(std::abs(total - total_want) <= 1e-4 * std::max(1.0, std::abs(total_want)));
}

static void test_masked_terms() {
  for (float l : {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::max()}) {
    float beta = 1.f, ls = 1.f;
    molm::core::sb_terms(l, beta, ls);
    CHECK(beta == 0.f && ls == 0.f);
  }
  float beta, ls;
  molm::core::sb_terms(0.f, beta, ls);
  CHECK(beta == 0.5f && std::abs(ls - std::log(0.5f)) < 1e-7f);
}

// Splitting the keys into chunks and combining newest-first gives the single-pass result.
static void test_combine(int64_t n, int64_t chunk, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.5);
  const int64_t d = 3;
  std::vector<double> l(n), v(n * d);
  for (auto& x : l) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  const std::vector<double> a = naive_weights(l, n - 1);
  std::vector<double> want(d, 0.0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t x = 0; x < d; ++x) want[x] += a[j] * v[j * d + x];
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  std::vector<double> o(n_chunks * d, 0.0), s(n_chunks, 0.0);
  for (int64_t c = 0; c < n_chunks; ++c) {  // chunk 0 = newest keys
    const int64_t hi = n - c * chunk, lo = std::max<int64_t>(0, hi - chunk);
    std::vector<double> lc(l.begin() + lo, l.begin() + hi);
    s[c] = molm::core::sb_scan_row<double>(lc.data(), hi - lo - 1, hi - lo, 1.0, nullptr);
    for (int64_t j = lo; j < hi; ++j)
      for (int64_t x = 0; x < d; ++x) o[c * d + x] += lc[j - lo] * v[j * d + x];
  }
  std::vector<double> got(d);
  molm::core::sb_combine_chunks(o.data(), s.data(), n_chunks, d, d, got.data());
  for (int64_t x = 0; x < d; ++x) CHECK(std::abs(got[x] - want[x]) <= 1e-12);
}

int main() {
  test_masked_terms();
  test_scan(1, 0, 1, false);
  test_scan(7, 6, 2, false);
  test_scan(97, 60, 3, true);
  test_scan(1025, 1024, 4, false);
  test_scan(1025, 1024, 5, true);
  test_combine(10, 3, 6);
  test_combine(1025, 512, 7);
  test_combine(5, 8, 8);
  TEST_MAIN_RETURN();
}
