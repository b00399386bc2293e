// CPU gather / scatter between token order and expert-sorted order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../checks.h"
#include "../dispatch.h"

namespace molm::cpu {
namespace {

// out[i] = x[index[i] // group]: one memcpy per row.
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, int64_t group) {
  check_gather_rows(x, index, group);
  const int64_t m = index.numel(), n_rows = x.size(0), c = x.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t limit = n_rows * group;  // valid index values are 0 .. R*group - 1
  int64_t bad = -1;
  for (int64_t i = 0; i < m; ++i)
    if (idx[i] < 0 || idx[i] >= limit) {
      bad = i;
      break;
    }
  TORCH_CHECK_VALUE(bad < 0, "molm::gather_rows: index[", bad, "] = ", bad < 0 ? 0 : idx[bad],
                    " is out of range: with x.size(0) = ", n_rows, " and group = ", group, " valid values are 0..",
                    limit - 1);
  at::Tensor out = at::empty({m, c}, x.options());  // [M, C]
  if (m == 0 || c == 0) return out;
  const int64_t row_bytes = c * x.element_size(), x_stride = x.stride(0) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, m, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * row_bytes, src + (idx[i] / group) * x_stride, row_bytes);
  });
  return out;
}

template <typename scalar_t>
void scatter_ksum_kernel(const at::Tensor& y, const at::Tensor& gates, const int64_t* pos, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n_tokens = gates.size(0), k = gates.size(1), c = y.size(1), ys = y.stride(0);
  const at::Tensor g = gates.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [N, k]
  const acc_t* gp = g.data_ptr<acc_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c * k, 1));
  at::parallel_for(0, n_tokens, grain, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> acc(c);
    for (int64_t n = lo; n < hi; ++n) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {  // slot order j = 0..k-1, as the reference
        const acc_t gj = gp[n * k + j];
        const scalar_t* row = yp + pos[n * k + j] * ys;
        for (int64_t x = 0; x < c; ++x) acc[x] += gj * static_cast<acc_t>(row[x]);
      }
      scalar_t* o = op + n * c;
      for (int64_t x = 0; x < c; ++x) o[x] = static_cast<scalar_t>(acc[x]);
    }
  });
}

// out[n] = sum_j gates[n, j] * y[slot_positions[n*k + j]] in slot order, accumulated in fp32 (fp64 for fp64).
at::Tensor scatter_ksum_cpu(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& slot_positions) {
  check_scatter_ksum(y, gates, slot_positions);
  const int64_t m = y.size(0);
  const int64_t* pos = slot_positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK_VALUE(pos[i] >= 0 && pos[i] < m, "molm::scatter_ksum: slot_positions[", i, "] = ", pos[i],
                      " is out of range 0..", m - 1);
  at::Tensor out = at::empty({gates.size(0), y.size(1)}, y.options());  // [N, C]
  if (out.numel() == 0) return out;
  MOLM_DISPATCH_FLOATING(y.scalar_type(), "molm::scatter_ksum",
                         [&] { scatter_ksum_kernel<scalar_t>(y, gates, pos, out); });
  return out;
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) {
  m.impl("gather_rows", &molm::cpu::gather_rows_cpu);
  m.impl("scatter_ksum", &molm::cpu::scatter_ksum_cpu);
}
