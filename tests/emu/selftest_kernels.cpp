// CUDA-style kernels, written as they would be in a .cu file, that test the CPU emulator (tests/cuda_emu/cuda_emu.h)
// from tests/test_cuda_emu.py. Each extern "C" entry point launches through molm_emu on host pointers and returns 0,
// or -1 with the message in emu_last_error(): a trap or bad launch never takes the Python process down.
#ifdef MOLM_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#endif

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>

using namespace nvcuda;

namespace {

// ---- warp shuffles ----------------------------------------------------------------------------------------------
constexpr int kScanOutputs = 8;

// out[k * n + i], k: 0 xor-butterfly warp sum, 1 inclusive prefix (up), 2 inclusive suffix (down), 3 gather from
// lane (7 * lane + 3) % 32, 4 prefix within 8-lane segments, 5 sums of 8-lane segments, 6 down by 3 in 16-lane
// segments (own value past the end), 7 __shfl_sync(lane + 5, width 16) (source lane taken modulo 16).
template <typename T>
__global__ void __launch_bounds__(128) warp_scan_kernel(const T* __restrict__ x, T* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const T v = x[i];
  T sum = v;
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  T pre = v, suf = v, seg = v;
  for (int d = 1; d < 32; d <<= 1) {
    const T a = __shfl_up_sync(0xffffffffu, pre, d);
    if (lane >= d) pre += a;
    const T b = __shfl_down_sync(0xffffffffu, suf, d);
    if (lane + d < 32) suf += b;
  }
  for (int d = 1; d < 8; d <<= 1) {
    const T a = __shfl_up_sync(0xffffffffu, seg, d, 8);
    if (lane % 8 >= d) seg += a;
  }
  T seg_sum = v;
  for (int off = 4; off > 0; off >>= 1) seg_sum += __shfl_xor_sync(0xffffffffu, seg_sum, off, 8);
  out[0 * n + i] = sum;
  out[1 * n + i] = pre;
  out[2 * n + i] = suf;
  out[3 * n + i] = __shfl_sync(0xffffffffu, v, (7 * lane + 3) % 32);
  out[4 * n + i] = seg;
  out[5 * n + i] = seg_sum;
  out[6 * n + i] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  out[7 * n + i] = __shfl_sync(0xffffffffu, v, lane + 5, 16);
}

// out[k * n + i], k: 0 ballot(pred), 1 any, 2 all, 3 match_any(key), 4 activemask.
__global__ void vote_kernel(const int* pred, const int* key, unsigned* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[0 * n + i] = __ballot_sync(0xffffffffu, pred[i]);
  out[1 * n + i] = __any_sync(0xffffffffu, pred[i]);
  out[2 * n + i] = __all_sync(0xffffffffu, pred[i]);
  out[3 * n + i] = __match_any_sync(0xffffffffu, key[i]);
  out[4 * n + i] = __activemask();
}

// Lanes 16..31 return; the rest sum over 16 lanes with xor offsets below `top` (16 reads exited lanes), and
// record __activemask() after a __syncwarp with `mask`.
__global__ void lane_exit_kernel(const float* x, float* sums, unsigned* active, int top, unsigned mask) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  __syncwarp(mask);
  active[lane] = __activemask();
  float s = x[lane];
  for (int off = top; off > 0; off >>= 1) s += __shfl_xor_sync(mask, s, off);
  sums[lane] = s;
}

// ---- block-level: dynamic smem, __syncthreads, indices -----------------------------------------------------------
// Each CTA of a 2-D grid sums its blockDim-sized chunk `reps` times (tree reduction, 2 barriers per level) and
// records its indices; threads use the linear id of a 3-D block.
__global__ void block_sum_kernel(const float* x, float* sums, unsigned* ids, int reps) {
#ifdef MOLM_CUDA_EMU
  unsigned char* smem = molm_emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw;
#endif
  float* buf = reinterpret_cast<float*>(smem);
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int cta = blockIdx.x + gridDim.x * blockIdx.y;
  float total = 0.f;
  for (int r = 0; r < reps; ++r) {
    buf[tid] = x[cta * nt + tid];
    __syncthreads();
    for (int s = nt / 2; s > 0; s >>= 1) {
      if (tid < s) buf[tid] += buf[tid + s];
      __syncthreads();
    }
    total += buf[0];
    __syncthreads();  // buf[0] is read by all before the next repetition overwrites buf
  }
  if (tid == 0) {
    sums[cta] = total;
    unsigned* id = ids + 6 * cta;
    id[0] = blockIdx.x, id[1] = blockIdx.y, id[2] = blockIdx.z;
    id[3] = gridDim.x, id[4] = gridDim.y, id[5] = nt;
  }
}

// Warp w of CTA b owns row b * 8 + w; warps past the last row return before the CTA's __syncthreads.
// out[row] = sum of the row + sum of the CTA's first row (read from smem after the barrier).
__global__ void early_return_kernel(const float* x, float* out, int rows) {
  float* part = reinterpret_cast<float*>(molm_emu::dynamic_smem());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + warp;
  if (row >= rows) return;
  float s = x[row * 32 + lane];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) part[warp] = s;
  __syncthreads();
  __syncwarp();
  if (lane == 0) out[row] = s + part[0];
}

// Copies the CTA's smem as found (poisoned) into out, then dirties it: the next CTA must find it poisoned again.
__global__ void smem_poison_kernel(unsigned* out) {
  unsigned* s = reinterpret_cast<unsigned*>(molm_emu::dynamic_smem());
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = threadIdx.x;
}

// One __pipeline_memcpy_async of `size` bytes (zfill of them zeroed) into smem, then smem to dst.
__global__ void async_copy_kernel(const unsigned char* src, unsigned char* dst, int size, int zfill) {
  unsigned char* s = molm_emu::dynamic_smem();
  if (threadIdx.x == 0) {
    __pipeline_memcpy_async(s, src, size, zfill);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    for (int b = 0; b < size; ++b) dst[b] = s[b];
  }
}

// Thread 0 copies 16 bytes from src into smem and copies smem to dst before (early = 1) or after its wait: before
// it the copy has not landed (the emulator shows poison, 0xFF bytes, as any undefined value could be on a GPU).
__global__ void async_early_read_kernel(const unsigned char* src, unsigned char* dst, int early) {
  unsigned char* s = molm_emu::dynamic_smem();
  if (threadIdx.x != 0) return;
  __pipeline_memcpy_async(s, src, 16);
  __pipeline_commit();
  if (!early) __pipeline_wait_prior(0);
  for (int b = 0; b < 16; ++b) dst[b] = s[b];
  __pipeline_wait_prior(0);
}

// out[lane] = sum over chunks c of x[c * 128 + 4 * lane .. + 3] through a 2-slot cp.async ring: chunk c + 1 is
// issued before chunk c is read, after waiting until `wait` groups are left in flight. 1 is right (the group just
// issued); 2 reads slot c % 2 before its copy lands, a wrong wait count that can pass on a GPU by timing alone.
__global__ void async_ring_kernel(const float* x, float* out, int chunks, int wait) {
  float* ring = reinterpret_cast<float*>(molm_emu::dynamic_smem());  // [2][128]
  const int lane = threadIdx.x;
  __pipeline_memcpy_async(ring + 4 * lane, x + 4 * lane, 16);
  __pipeline_commit();
  float sum = 0.f;
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) __pipeline_memcpy_async(ring + (c + 1) % 2 * 128 + 4 * lane, x + (c + 1) * 128 + 4 * lane, 16);
    __pipeline_commit();
    __pipeline_wait_prior(wait);
    __syncwarp();
    const float* slot = ring + c % 2 * 128 + 4 * lane;
    sum += slot[0] + slot[1] + slot[2] + slot[3];
    __syncwarp();  // slot c % 2 is refilled at step c + 1
  }
  __pipeline_wait_prior(0);
  out[lane] = sum;
}

// cp.async writes shared memory only: dst is a global buffer here (a bug).
__global__ void async_global_dst_kernel(const unsigned char* src, unsigned char* dst) {
  if (threadIdx.x == 0) __pipeline_memcpy_async(dst, src, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// ---- CTA scheduling ----------------------------------------------------------------------------------------------
// order[cta] = how many CTAs started before this one.
__global__ void cta_order_kernel(unsigned* counter, unsigned* order) {
  if (threadIdx.x == 0) order[blockIdx.x] = atomicAdd(counter, 1u);
}

// A broken kernel: CTA b continues CTA b - 1's count through global memory, which works only if the CTAs run one
// after the other in index order (CUDA promises no order).
__global__ void chain_kernel(float* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = (blockIdx.x == 0 ? 0.f : out[blockIdx.x - 1]) + 1.f;
}

// Each CTA counts itself into *live, then waits (10 s at most) for every CTA of the grid to have arrived and records
// the count it saw: the CTAs of a small grid are resident at the same time on a GPU.
__global__ void coresident_kernel(int* live, int* seen) {
  if (threadIdx.x != 0) return;
  atomicAdd(live, 1);
  const auto t0 = std::chrono::steady_clock::now();
  while (__atomic_load_n(live, __ATOMIC_SEQ_CST) < int(gridDim.x) &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10))
    std::this_thread::yield();
  seen[blockIdx.x] = __atomic_load_n(live, __ATOMIC_SEQ_CST);
}

// Kernels that only take dynamic shared memory: their limits are raised (or not) one by one.
template <int kWhich>
__global__ void smem_user_kernel() {}

// ---- WMMA fragments: each lane holds its share --------------------------------------------------------------------
// Loads the 16x16 fp32 tile c (row-major) into an accumulator and writes it to out (row-major): mode 0 with
// store_matrix_sync; 1 the same after doubling every x[i] (elementwise: portable); 2 lane 0 writes x[0 ..
// num_elements) as if it held the whole tile row-major (a layout CUDA does not give); 3 each lane writes x[lane]
// (past num_elements for lanes 8 and up).
__global__ void wmma_share_kernel(const float* c, float* out, int mode) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f;
  wmma::load_matrix_sync(f, c, 16, wmma::mem_row_major);
  const int lane = threadIdx.x % 32;
  if (mode == 1)
    for (int i = 0; i < f.num_elements; ++i) f.x[i] *= 2.f;
  if (mode == 2) {
    if (lane == 0)
      for (int i = 0; i < f.num_elements; ++i) out[i] = f.x[i];
    return;
  }
  if (mode == 3) {
    out[lane] = f.x[lane];
    return;
  }
  wmma::store_matrix_sync(out, f, 16, wmma::mem_row_major);
}

// Zeroes x[0] of a loaded matrix_a fragment before mma_sync (not emulated: a trap).
__global__ void wmma_changed_operand_kernel(const __nv_bfloat16* a, float* out) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, a, 16);
  wmma::fill_fragment(acc, 0.f);
  fa.x[0] = __float2bfloat16(0.f);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

// ---- WMMA GEMM ----------------------------------------------------------------------------------------------------
// D[M, N] = alpha * A[M, K] @ B + C0, A row-major, B row-major [K, N] or col-major (stored [N, K]); D row-major
// [M, N] or col-major ([N, M]). CTA: 4 warps, a 32x32 tile; each warp one 16x16 tile. K-steps of 16 stage A and
// B through smem with 16-byte async copies, zero-filling what lies outside the matrices (M, N multiples of 16,
// K of 8); warps whose tile lies outside D still take part in the barriers.
constexpr int kBM = 32, kBN = 32, kBK = 16, kPad = 8;
constexpr int kLdA = kBK + kPad, kLdBRow = kBN + kPad, kLdBCol = kBK + kPad;

template <typename T, bool kBRow, bool kDRow>
__global__ void __launch_bounds__(128)
    wmma_gemm_kernel(const T* A, const T* B, const float* C0, float* D, int M, int N, int K, float alpha) {
#ifdef MOLM_CUDA_EMU
  unsigned char* smem = molm_emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw;
#endif
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kBM * kLdA;
  const int tid = threadIdx.x, warp = tid / 32;
  const int m_cta = blockIdx.y * kBM, n_cta = blockIdx.x * kBN;
  const int m0 = m_cta + (warp / 2) * 16, n0 = n_cta + (warp % 2) * 16;
  const bool active = m0 < M && n0 < N;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k0 = 0; k0 < K; k0 += kBK) {
    const int c = tid % 64;  // 64 16-byte chunks per operand tile: threads 0..63 copy A, 64..127 copy B
    if (tid < 64) {
      const int r = c / 2, k = k0 + (c % 2) * 8;
      const bool in = m_cta + r < M && k < K;
      __pipeline_memcpy_async(As + r * kLdA + (c % 2) * 8, in ? A + (m_cta + r) * K + k : A, 16, in ? 0 : 16);
    } else if (kBRow) {
      const int r = c / 4, n = n_cta + (c % 4) * 8;
      const bool in = k0 + r < K && n < N;
      __pipeline_memcpy_async(Bs + r * kLdBRow + (c % 4) * 8, in ? B + (k0 + r) * N + n : B, 16, in ? 0 : 16);
    } else {
      const int r = c / 2, k = k0 + (c % 2) * 8;
      const bool in = n_cta + r < N && k < K;
      __pipeline_memcpy_async(Bs + r * kLdBCol + (c % 2) * 8, in ? B + (n_cta + r) * K + k : B, 16, in ? 0 : 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    if (active) {
      using LayoutB = typename std::conditional<kBRow, wmma::row_major, wmma::col_major>::type;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      wmma::load_matrix_sync(a, As + (warp / 2) * 16 * kLdA, kLdA);
      if (kBRow)
        wmma::load_matrix_sync(b, Bs + (warp % 2) * 16, kLdBRow);
      else
        wmma::load_matrix_sync(b, Bs + (warp % 2) * 16 * kLdBCol, kLdBCol);
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }
  if (!active) return;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c0;
  wmma::load_matrix_sync(c0, C0 + m0 * N + n0, N, wmma::mem_row_major);
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = alpha * acc.x[i] + c0.x[i];
  if (kDRow)
    wmma::store_matrix_sync(D + m0 * N + n0, acc, N, wmma::mem_row_major);
  else
    wmma::store_matrix_sync(D + n0 * M + m0, acc, M, wmma::mem_col_major);
}

// Loads an accumulator with a given ldm and offset (in floats): the emulator must trap on CUDA's ldm/alignment rules.
__global__ void wmma_bad_load_kernel(const float* p, int ldm, int offset) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, p + offset, ldm, wmma::mem_row_major);
}

// ---- failures ------------------------------------------------------------------------------------------------------
// Thread `who` of CTA `cta` traps while the others wait at a barrier (or have finished).
__global__ void trap_kernel(int cta, int who) {
  __syncthreads();
  if (static_cast<int>(blockIdx.x) == cta && static_cast<int>(threadIdx.x) == who) molm_emu::trap("boom");
  __syncthreads();
  __syncthreads();
}

// Half of a warp waits at __syncwarp, the other half at __syncthreads: a deadlock on hardware too.
__global__ void deadlock_kernel() {
  if (threadIdx.x % 32 < 16)
    __syncwarp();
  else
    __syncthreads();
}

__global__ void noop_kernel() {}

thread_local std::string g_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    g_error.clear();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

template <typename T>
int warp_scan(const T* x, T* out, int n) {
  return guarded([&] { molm_emu::launch(dim3(n / 128), dim3(128), 0, warp_scan_kernel<T>, x, out, n); });
}

template <typename T, bool kBRow, bool kDRow>
void gemm(const T* A, const T* B, const float* C0, float* D, int M, int N, int K, float alpha) {
  const std::size_t smem = (kBM * kLdA + (kBRow ? kBK * kLdBRow : kBN * kLdBCol)) * sizeof(T);
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  molm_emu::launch(grid, dim3(128), smem, wmma_gemm_kernel<T, kBRow, kDRow>, A, B, C0, D, M, N, K, alpha);
}

template <typename T>
int gemm_dispatch(const void* A, const void* B, const float* C0, float* D, int M, int N, int K, float alpha, int b_row,
                  int d_row) {
  const T* a = static_cast<const T*>(A);
  const T* b = static_cast<const T*>(B);
  return guarded([&] {
    if (b_row && d_row) gemm<T, true, true>(a, b, C0, D, M, N, K, alpha);
    if (b_row && !d_row) gemm<T, true, false>(a, b, C0, D, M, N, K, alpha);
    if (!b_row && d_row) gemm<T, false, true>(a, b, C0, D, M, N, K, alpha);
    if (!b_row && !d_row) gemm<T, false, false>(a, b, C0, D, M, N, K, alpha);
  });
}

}  // namespace

extern "C" {

const char* emu_last_error() { return g_error.c_str(); }

int emu_warp_scan_f32(const float* x, float* out, int n) { return warp_scan(x, out, n); }
int emu_warp_scan_f64(const double* x, double* out, int n) { return warp_scan(x, out, n); }
int emu_warp_scan_i32(const int* x, int* out, int n) { return warp_scan(x, out, n); }
int emu_warp_scan_u32(const unsigned* x, unsigned* out, int n) { return warp_scan(x, out, n); }
int emu_warp_scan_i64(const long long* x, long long* out, int n) { return warp_scan(x, out, n); }

int emu_vote(const int* pred, const int* key, unsigned* out, int n) {
  return guarded([&] { molm_emu::launch(dim3(n / 64), dim3(64), 0, vote_kernel, pred, key, out, n); });
}

int emu_lane_exit(const float* x, float* sums, unsigned* active, int top, unsigned mask) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 0, lane_exit_kernel, x, sums, active, top, mask); });
}

int emu_block_sum(const float* x, float* sums, unsigned* ids, int gx, int gy, int bx, int by, int bz, int reps) {
  const std::size_t smem = std::size_t(bx) * by * bz * sizeof(float);
  return guarded([&] { molm_emu::launch(dim3(gx, gy), dim3(bx, by, bz), smem, block_sum_kernel, x, sums, ids, reps); });
}

int emu_early_return(const float* x, float* out, int rows) {
  return guarded(
      [&] { molm_emu::launch(dim3((rows + 7) / 8), dim3(256), 8 * sizeof(float), early_return_kernel, x, out, rows); });
}

int emu_smem_poison(unsigned* out, int ctas) {
  return guarded([&] { molm_emu::launch(dim3(ctas), dim3(64), 64 * sizeof(unsigned), smem_poison_kernel, out); });
}

int emu_async_copy(const unsigned char* src, unsigned char* dst, int size, int zfill) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 64, async_copy_kernel, src, dst, size, zfill); });
}

int emu_async_early_read(const unsigned char* src, unsigned char* dst, int early) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 16, async_early_read_kernel, src, dst, early); });
}

int emu_async_ring(const float* x, float* out, int chunks, int wait) {
  return guarded(
      [&] { molm_emu::launch(dim3(1), dim3(32), 2 * 128 * sizeof(float), async_ring_kernel, x, out, chunks, wait); });
}

int emu_async_global_dst(const unsigned char* src, unsigned char* dst) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 16, async_global_dst_kernel, src, dst); });
}

int emu_set_schedule(unsigned long long seed, int concurrent_ctas, int shuffle) {
  return guarded([&] { molm_emu::set_schedule(seed, concurrent_ctas, shuffle != 0); });
}

int emu_cta_order(unsigned* order, int ctas) {
  unsigned counter = 0;
  return guarded([&] { molm_emu::launch(dim3(ctas), dim3(32), 0, cta_order_kernel, &counter, order); });
}

int emu_chain(float* out, int ctas) {
  return guarded([&] { molm_emu::launch(dim3(ctas), dim3(32), 0, chain_kernel, out); });
}

int emu_coresident(int* seen, int ctas) {
  int live = 0;
  return guarded([&] { molm_emu::launch(dim3(ctas), dim3(32), 0, coresident_kernel, &live, seen); });
}

// which: 0 or 1 (two kernels with separate limits). Returns the cudaError_t of cudaFuncSetAttribute.
int emu_smem_opt_in(int which, int bytes) {
  const auto attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
  return which == 0 ? cudaFuncSetAttribute(smem_user_kernel<0>, attr, bytes)
                    : cudaFuncSetAttribute(smem_user_kernel<1>, attr, bytes);
}

int emu_smem_launch(int which, long long bytes) {
  return guarded([&] {
    if (which == 0)
      molm_emu::launch(dim3(1), dim3(32), std::size_t(bytes), smem_user_kernel<0>);
    else
      molm_emu::launch(dim3(1), dim3(32), std::size_t(bytes), smem_user_kernel<1>);
  });
}

int emu_wmma_share(const float* c, float* out, int mode) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 0, wmma_share_kernel, c, out, mode); });
}

int emu_wmma_changed_operand(const void* a, float* out) {
  return guarded([&] {
    molm_emu::launch(dim3(1), dim3(32), 0, wmma_changed_operand_kernel, static_cast<const __nv_bfloat16*>(a), out);
  });
}

// dtype: 0 bf16, 1 fp16 (raw 16-bit patterns).
int emu_wmma_gemm(int dtype, const void* A, const void* B, const float* C0, float* D, int M, int N, int K, float alpha,
                  int b_row, int d_row) {
  if (dtype == 0) return gemm_dispatch<__nv_bfloat16>(A, B, C0, D, M, N, K, alpha, b_row, d_row);
  return gemm_dispatch<__half>(A, B, C0, D, M, N, K, alpha, b_row, d_row);
}

int emu_wmma_bad_load(const float* p, int ldm, int offset) {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 0, wmma_bad_load_kernel, p, ldm, offset); });
}

int emu_trap(int ctas, int cta, int who) {
  return guarded([&] { molm_emu::launch(dim3(ctas), dim3(256), 0, trap_kernel, cta, who); });
}

int emu_deadlock() {
  return guarded([&] { molm_emu::launch(dim3(1), dim3(32), 0, deadlock_kernel); });
}

int emu_launch_config(int bx, int by, int bz, int gx, long long smem) {
  return guarded([&] { molm_emu::launch(dim3(gx), dim3(bx, by, bz), std::size_t(smem), noop_kernel); });
}

int emu_set_max_smem(long long bytes) {
  return guarded([&] { molm_emu::set_max_dynamic_smem(std::size_t(bytes)); });
}

// Host-side conversions over arrays (16-bit values as raw bits).
void emu_f2bf(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16(in[i]));
}
void emu_bf2f(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}
void emu_f2h(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half(in[i]));
}
void emu_h2f(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
// out[0..3]: the bits of __floats2bfloat162_rn(a, b) and __floats2half2_rn(a, b), low half first.
void emu_pairs(float a, float b, unsigned short* out) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
  const __half2 q = __floats2half2_rn(a, b);
  out[0] = __bfloat16_as_ushort(p.x), out[1] = __bfloat16_as_ushort(p.y);
  out[2] = __half_as_ushort(q.x), out[3] = __half_as_ushort(q.y);
}

}  // extern "C"
