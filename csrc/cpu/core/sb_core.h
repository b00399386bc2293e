// Torch-free stick-breaking math (ModuleFormer variant: diagonal included, leftover mass dropped).
// For a query at position i and keys j <= i, with logits l_j (scale and padding bias already applied):
//   beta_j = sigmoid(l_j), log(1 - beta_j) = logsigmoid(-l_j) = -softplus(l_j),
//   A_j = beta_j * exp(sum_{j < m <= i} log(1 - beta_m)),  o = sum_j A_j v_j.
// Walking j from i down to 0 makes the exponent a running sum ("cum"), so every weight is known when its key is
// read. Tested in tests/cpp/test_sb_scan.cpp against a double-precision loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace molm::core {

// beta = sigmoid(l), survive = 1 - beta = sigmoid(-l) (exact even where beta rounds to 1) and log_survive =
// log(1 - beta) = -softplus(l), stable for all l. A masked key (l = -inf or l = finfo.min) gives beta = 0, survive = 1
// and log_survive = 0 exactly, as the reference's masked_fill does. The CUDA kernels use it too (std::exp, std::abs
// and std::log1p are the same instructions as expf, fabsf and log1pf on the device).
template <typename acc_t>
MOLM_HOST_DEVICE inline void sb_terms(acc_t l, acc_t& beta, acc_t& survive, acc_t& log_survive) {
  const acc_t e = std::exp(-std::abs(l));  // in (0, 1]
  const acc_t one = acc_t(1);
  beta = (l >= acc_t(0) ? one : e) / (one + e);
  survive = (l >= acc_t(0) ? e : one) / (one + e);
  log_survive = -((l > acc_t(0) ? l : acc_t(0)) + std::log1p(e));
}

template <typename acc_t>
MOLM_HOST_DEVICE inline void sb_terms(acc_t l, acc_t& beta, acc_t& log_survive) {
  acc_t survive;
  sb_terms(l, beta, survive, log_survive);
}

// In place: raw scores l[0..i] (q.k of keys 0..i) -> stick-breaking weights A[0..i], with the logit
// l_j * scale + bias[j] (bias may be null); entries i+1 .. width-1 are set to 0. Returns sum_{j<=i} log(1 - beta_j).
template <typename acc_t>
inline acc_t sb_scan_row(acc_t* l, int64_t i, int64_t width, acc_t scale, const acc_t* bias) {
  acc_t cum = acc_t(0);
  for (int64_t j = i; j >= 0; --j) {
    acc_t beta, ls;
    sb_terms(bias ? l[j] * scale + bias[j] : l[j] * scale, beta, ls);
    l[j] = beta * std::exp(cum);
    cum += ls;
  }
  for (int64_t j = std::max<int64_t>(i + 1, 0); j < width; ++j) l[j] = acc_t(0);
  return cum;
}

// Backward of one query row. On entry a[0..width) holds the raw scores q.k_j and g[0..width) holds
// dA_j = dO . v_j; on exit a holds the weights A_j and g holds dl_j, the gradient of the logit
// l_j = a_j * scale + bias[j] (entries i+1 .. width-1 of both are set to 0). With P_j = A_j dA_j:
//   dl_j = P_j (1 - beta_j) - beta_j * sum_{m<j} P_m
// (beta_j scales A_j; log(1 - beta_j), with derivative -beta_j, enters every A_m with m < j).
// Two exact passes: newest-to-oldest for A, oldest-to-newest for the prefix sum. scratch: 2 * (i + 1) values.
template <typename acc_t>
inline void sb_backward_row(acc_t* a, acc_t* g, int64_t i, int64_t width, acc_t scale, const acc_t* bias,
                            acc_t* scratch) {
  acc_t* beta = scratch;
  acc_t* survive = scratch + (i + 1);
  acc_t cum = acc_t(0);
  for (int64_t j = i; j >= 0; --j) {
    acc_t ls;
    sb_terms(bias ? a[j] * scale + bias[j] : a[j] * scale, beta[j], survive[j], ls);
    a[j] = beta[j] * std::exp(cum);
    cum += ls;
  }
  acc_t prefix = acc_t(0);
  for (int64_t j = 0; j <= i; ++j) {
    const acc_t p = a[j] * g[j];
    g[j] = p * survive[j] - beta[j] * prefix;
    prefix += p;
  }
  for (int64_t j = std::max<int64_t>(i + 1, 0); j < width; ++j) a[j] = g[j] = acc_t(0);
}

// Split-KV combine: chunks c = 0..n-1 are ordered newest (nearest the query) first; chunk c holds the partial output
// o_c[0..d) computed with its own running sum starting at 0, and its total log-survival s_c. The result is
// o = o_0 + exp(s_0) * (o_1 + exp(s_1) * (o_2 + ...)), accumulated newest to oldest into out[0..d).
template <typename acc_t>
inline void sb_combine_chunks(const acc_t* o_chunks, const acc_t* s_chunks, int64_t n_chunks, int64_t d,
                              int64_t chunk_stride, acc_t* out) {
  for (int64_t x = 0; x < d; ++x) out[x] = acc_t(0);
  acc_t carried = acc_t(0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const acc_t w = std::exp(carried);
    const acc_t* oc = o_chunks + c * chunk_stride;
    for (int64_t x = 0; x < d; ++x) out[x] += w * oc[x];
    carried += s_chunks[c];
  }
}

}  // namespace molm::core
