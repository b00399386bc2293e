// The registered ops through the dispatcher, no Python: sb_attention decode and prefill against a naive
// double-precision loop, route_topk's sort invariants, and a check that bad input raises c10::ValueError.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include "check.h"

static at::Tensor sb_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& bias, double scale) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("molm::sb_attention", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double)>();
  return op.call(q, k, v, bias, scale);
}

// o[b, t, g, h] = sum_{j <= i} sigmoid(l_j) prod_{j<m<=i} (1 - sigmoid(l_m)) v_j, in double
static at::Tensor naive_sb(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), S = k.size(1);
  at::Tensor out = at::zeros_like(qd);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = S - T + t;
          double cum = 1.0;
          at::Tensor o = out[b][t][g][h];
          for (int64_t j = i; j >= 0; --j) {
            const double l = qd[b][t][g][h].dot(kd[b][j][h]).item<double>() * scale;
            const double beta = 1.0 / (1.0 + std::exp(-l));
            o.add_(vd[b][j][h], beta * cum);
            cum *= 1.0 - beta;
          }
        }
  return out;
}

static void test_sb(int64_t B, int64_t T, int64_t S, int64_t G, int64_t H, int64_t D, at::ScalarType dtype,
                    double tol) {
  at::manual_seed(B * 1000 + T * 100 + S);
  const auto q = at::randn({B, T, G, H, D}).to(dtype), k = at::randn({B, S, H, D}).to(dtype),
             v = at::randn({B, S, H, D}).to(dtype);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const at::Tensor got = sb_attention(q, k, v, c10::nullopt, scale);
  const double err = (got.to(at::kDouble) - naive_sb(q, k, v, scale)).abs().max().item<double>();
  if (!(err <= tol)) std::fprintf(stderr, "sb B=%ld T=%ld S=%ld err=%g\n", (long)B, (long)T, (long)S, err);
  CHECK(err <= tol);
}

int main() {
  test_sb(1, 1, 1, 1, 1, 8, at::kFloat, 1e-5);
  test_sb(2, 1, 600, 2, 1, 16, at::kFloat, 1e-5);  // two split-KV chunks
  test_sb(1, 3, 9, 2, 4, 12, at::kFloat, 1e-5);
  test_sb(1, 20, 40, 2, 1, 8, at::kFloat, 1e-5);   // tiled path
  test_sb(1, 1, 50, 2, 1, 16, at::kBFloat16, 1e-2);  // output rounded to bf16
  test_sb(1, 10, 20, 1, 2, 8, at::kDouble, 1e-12);

  auto route = c10::Dispatcher::singleton().findSchemaOrThrow("molm::route_topk", "").typed<
      std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  const auto [probs, gates, experts, sorted, pos, offsets] = route.call(at::randn({33, 8}), 2);
  CHECK(offsets[8].item<int64_t>() == 66);
  CHECK(at::equal(pos.index({sorted}), at::arange(66)));
  CHECK(at::equal(std::get<1>(at::sort(experts.reshape(-1), true, 0, false)), sorted));

  bool raised = false;
  try {
    route.call(at::randn({3, 4}), 5);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("molm::route_topk: k must be in") != std::string::npos;
  }
  CHECK(raised);
  TEST_MAIN_RETURN();
}
