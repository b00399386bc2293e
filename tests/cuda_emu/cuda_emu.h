// CPU emulator of the CUDA subset molm's kernels use, so the same kernel source compiles with g++ (-DMOLM_CUDA_EMU
// -pthread) and can be tested without a GPU. Every CUDA thread is a std::thread; CTAs run in a shuffled order, two at
// a time.
// Semantics and limits: tests/cuda_emu/README.md.
#pragma once

#include <math.h>  // the C++ wrapper: expf, fabsf, fminf, ... and the float overloads of fabs/exp in the global namespace

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

// ---- qualifiers ------------------------------------------------------------------------------------------------
// Only __forceinline__ becomes `inline` (g++ rejects a repeated `inline`, e.g. from `__host__ __device__`), so
// device functions defined in a header shared by several emulated TUs must be inline, static or templates.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#undef __shared__  // static shared arrays are not emulated: left undefined so that using one fails to compile

// ---- vector types and built-in indices -------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Set by the launcher for each emulated thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace molm_emu {

constexpr std::size_t kMaxDynamicSmem = 232448;         // H100/H200 opt-in limit per block (227 KiB)
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)

namespace detail {

// thrown by trap(); not a std::exception so kernel code cannot swallow it
struct Trap {
  std::string msg;
};
struct Aborted {};  // unwinds threads blocked at a barrier after another thread trapped

// The CTAs of one launch, in the (shuffled) order in which the concurrently running CTA slots take them.
struct Schedule {
  std::vector<std::size_t> order;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stop{false};  // a CTA failed: the other slots stop after their current CTA
  std::uint64_t seed = 0;
};

// Generation-counting barrier with arrive-and-drop: `expected` is the number of live participants.
struct Barrier {
  int expected = 0, arrived = 0;
  unsigned long gen = 0;
  std::condition_variable cv;
  const unsigned* live = nullptr;  // warp barriers: the warp's live lanes,
  unsigned live_at_release = 0;    // copied when the barrier completes (lanes may exit right after it)
};

// State of the CTA being run. One mutex guards all barriers so a deadlock (every live thread blocked) is visible.
struct Cta {
  int nthreads = 0, nwarps = 0;
  std::mutex m;
  Barrier block;
  std::unique_ptr<Barrier[]> warp;
  std::vector<unsigned> warp_live;  // live lanes of each warp
  int live = 0, blocked = 0;
  bool aborted = false;
  std::string error;
  std::vector<std::uint64_t> xchg;  // 2 x 32 slots per warp: double-buffered, so one barrier per exchange suffices
  std::unique_ptr<unsigned char[]> smem_alloc;
  unsigned char* smem = nullptr;
  std::size_t smem_bytes = 0;
  dim3 grid;
  Schedule* schedule = nullptr;
  std::size_t cta_index = 0;  // linear index of the CTA being run
  // End-of-CTA gate: all threads meet there before the next CTA starts.
  int done = 0;
  unsigned long cta_gen = 0;
  bool stop = false;
  std::condition_variable gate;
};

// ThreadSanitizer (-fsanitize=thread): the one mutex would order every thread after every other at each barrier
// and hide a missing __syncthreads between warps. Under TSan the mutex's synchronisation is ignored and each barrier
// orders exactly its participants (release before arriving, acquire after it completes), so TSan reports
// shared-memory accesses of different warps that no __syncthreads separates.
#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
// The emulator's own bookkeeping under the mutex: neither its synchronisation nor its accesses are checked.
struct IgnoreSync {
  IgnoreSync() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~IgnoreSync() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
};
inline void tsan_release(void* addr) { __tsan_release(addr); }
inline void tsan_acquire(void* addr) { __tsan_acquire(addr); }
#else
struct IgnoreSync {};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

inline thread_local Cta* t_cta = nullptr;
inline thread_local int t_tid = 0;
inline thread_local unsigned t_xchg = 0;  // this lane's count of warp exchanges (selects the buffer half)

// This thread's async copies (cp.async): issued but not committed, then committed groups, oldest first. A copy reads
// its source when issued and lands in shared memory only when a wait retires its group.
struct AsyncCopy {
  unsigned char* dst;
  unsigned n, zfill;
  unsigned char data[16];
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> groups;
  void clear() {
    open.clear();
    groups.clear();
  }
};
inline thread_local AsyncCopies t_async;

inline Cta& cta() {
  if (t_cta == nullptr) throw std::runtime_error("molm_emu: device function called outside an emulated kernel");
  return *t_cta;
}
inline int warp_id() { return t_tid / 32; }
inline int lane_id() { return t_tid % 32; }

inline void abort_locked(Cta& c, const std::string& msg) {
  if (!c.aborted) c.error = msg;
  c.aborted = true;
  c.block.cv.notify_all();
  for (int w = 0; w < c.nwarps; ++w) c.warp[w].cv.notify_all();
}

inline void check_deadlock_locked(Cta& c) {
  if (!c.aborted && c.live > 0 && c.blocked == c.live)
    abort_locked(c, "deadlock: every live thread of block " + std::to_string(c.cta_index % c.grid.x) + "," +
                        std::to_string(c.cta_index / c.grid.x % c.grid.y) + "," +
                        std::to_string(c.cta_index / c.grid.x / c.grid.y) +
                        " waits at a barrier that cannot complete (divergent __syncthreads/__syncwarp?)");
}

// Completes b; the caller notifies b.cv (after unlocking where it can, so the woken threads find the mutex free).
inline void release_locked(Cta& c, Barrier& b, int waiters) {
  c.blocked -= waiters;  // the threads it wakes are running again
  b.arrived = 0;
  ++b.gen;
  if (b.live != nullptr) b.live_at_release = *b.live;
}

inline void arrive_and_wait_impl(Cta& c, Barrier& b) {
  std::unique_lock<std::mutex> lk(c.m);
  if (c.aborted) throw Aborted{};
  if (++b.arrived == b.expected) {
    release_locked(c, b, b.arrived - 1);  // the last arriver never blocked
    lk.unlock();
    b.cv.notify_all();
    return;
  }
  const unsigned long gen = b.gen;
  ++c.blocked;
  check_deadlock_locked(c);
  b.cv.wait(lk, [&] { return b.gen != gen || c.aborted; });
  if (b.gen == gen) throw Aborted{};
}

inline void arrive_and_wait(Cta& c, Barrier& b) {
  tsan_release(&b);
  {
    const IgnoreSync ignore;
    arrive_and_wait_impl(c, b);
  }
  tsan_acquire(&b);
}

// A thread that leaves the kernel drops out of both its barriers (and may thereby complete them).
inline void drop_locked(Cta& c, Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    release_locked(c, b, b.arrived);
    b.cv.notify_all();
  }
}
inline void exit_thread(Cta& c) {
  const IgnoreSync ignore;
  std::lock_guard<std::mutex> lk(c.m);
  --c.live;
  c.warp_live[warp_id()] &= ~(1u << lane_id());
  drop_locked(c, c.block);
  drop_locked(c, c.warp[warp_id()]);
  check_deadlock_locked(c);
}

inline void trap_in_kernel(const std::string& msg) { throw Trap{msg}; }

inline void warp_barrier(Cta& c) { arrive_and_wait(c, c.warp[warp_id()]); }

// The warp's live lanes as of its last barrier: a lane that already ran to the end of the kernel was, on hardware,
// still converged with the others at the point of the call.
inline unsigned live_lanes(Cta& c) {
  const IgnoreSync ignore;
  std::lock_guard<std::mutex> lk(c.m);
  return c.warp[warp_id()].live_at_release;
}

// Only masks that name every live lane of the warp are emulated (all barriers are whole-warp). Checked after the
// collective's barrier, when lanes that exit before it have dropped out.
inline unsigned check_mask(Cta& c, unsigned mask, const char* fn) {
  const unsigned live = live_lanes(c);
  if ((mask & live) != live)
    trap_in_kernel(std::string(fn) +
                   ": mask must include every live lane of the warp (partial masks are not emulated)");
  return live;
}

// Publishes this lane's 8-byte value and returns the warp's 32 slots, valid until this lane's next exchange: a
// lane reuses a half of the double buffer only after a barrier every lane reaches after reading it.
inline const std::uint64_t* exchange(Cta& c, std::uint64_t v) {
  std::uint64_t* slots = c.xchg.data() + (static_cast<std::size_t>(warp_id()) * 2 + (t_xchg++ & 1u)) * 32;
  slots[lane_id()] = v;
  warp_barrier(c);
  return slots;
}

template <typename T>
std::uint64_t to_slot(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffled types must be trivially copyable, <= 8 B");
  std::uint64_t s = 0;
  std::memcpy(&s, &v, sizeof(T));
  return s;
}
template <typename T>
T from_slot(std::uint64_t s) {
  T v;
  std::memcpy(&v, &s, sizeof(T));
  return v;
}

enum class Shfl { idx, up, down, bfly };

// PTX shfl.sync lane selection: segments of `width` lanes; an out-of-range source yields the caller's own value.
template <typename T>
T shfl(unsigned mask, T v, Shfl mode, int b, int width, const char* fn) {
  Cta& c = cta();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    trap_in_kernel(std::string(fn) + ": width must be a power of two in 1..32");
  const std::uint64_t* slots = exchange(c, to_slot(v));
  const unsigned live = check_mask(c, mask, fn);
  const int lane = lane_id(), seg = 32 - width;  // seg: the lane bits that select the segment
  const int min_lane = lane & seg, max_lane = min_lane | (31 & ~seg);
  int j = lane;
  bool ok = true;
  switch (mode) {
    case Shfl::idx:
      j = min_lane | (b & 31 & ~seg);
      ok = j <= max_lane;
      break;
    case Shfl::up:
      j = lane - b;
      ok = j >= min_lane;
      break;
    case Shfl::down:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case Shfl::bfly:
      j = lane ^ (b & 31);
      ok = j <= max_lane;
      break;
  }
  if (!ok) return v;
  if (!((mask & live) >> j & 1u))  // undefined on hardware: the source lane has exited or is not in mask
    trap_in_kernel(std::string(fn) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(j) +
                   ", which has exited or is not in the mask");
  return from_slot<T>(slots[j]);
}

inline std::atomic<std::size_t>& max_smem() {
  static std::atomic<std::size_t> v{kMaxDynamicSmem};
  return v;
}

inline void poison_smem(Cta& c) { std::memset(c.smem, 0xFF, c.smem_bytes); }  // reads of unset smem give NaN

// Resets barriers and liveness for the next CTA (called with the gate lock held, all threads waiting at the gate).
inline void reset_cta_locked(Cta& c) {
  c.live = c.nthreads;
  c.blocked = 0;
  c.block.expected = c.nthreads;
  c.block.arrived = 0;
  for (int w = 0; w < c.nwarps; ++w) {
    c.warp[w].expected = 32;
    c.warp[w].arrived = 0;
    c.warp_live[w] = 0xffffffffu;
    c.warp[w].live = &c.warp_live[w];
    c.warp[w].live_at_release = 0xffffffffu;
  }
  poison_smem(c);
}

// Takes the next CTA of the schedule for c (false: none left, or another slot failed).
inline bool take_next_locked(Cta& c) {
  Schedule& s = *c.schedule;
  if (s.stop.load()) return false;
  const std::size_t i = s.next.fetch_add(1);
  if (i >= s.order.size()) return false;
  c.cta_index = s.order[i];
  return true;
}

// Returns whether this slot stops (its CTA aborted, or no CTA is left); the last thread to arrive prepares the next
// CTA. Waiters read `stop`, not `aborted`, which threads already running the next CTA may set.
inline bool end_of_cta(Cta& c) {
  std::unique_lock<std::mutex> lk(c.m);
  if (++c.done == c.nthreads) {
    c.done = 0;
    if (c.aborted) c.schedule->stop = true;
    const bool stop = c.stop = c.aborted || !take_next_locked(c);
    if (!stop) reset_cta_locked(c);
    ++c.cta_gen;
    lk.unlock();
    c.gate.notify_all();
    return stop;
  }
  const unsigned long gen = c.cta_gen;
  c.gate.wait(lk, [&] { return c.cta_gen != gen; });
  return c.stop;
}

inline std::mutex& func_attr_mutex() {
  static std::mutex m;
  return m;
}
// Dynamic shared-memory limits raised by cudaFuncSetAttribute, per kernel.
inline std::map<const void*, std::size_t>& func_smem_limits() {
  static std::map<const void*, std::size_t> limits;
  return limits;
}
inline std::size_t func_smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lk(func_attr_mutex());
  const auto it = func_smem_limits().find(kernel);
  return it == func_smem_limits().end() ? kDefaultDynamicSmem : it->second;
}

struct ScheduleConfig {
  std::uint64_t seed;
  int concurrent_ctas;
  bool shuffle;
};
inline ScheduleConfig& schedule_config() {
  static ScheduleConfig cfg{[] {
                              const char* env = std::getenv("MOLM_EMU_SEED");
                              return env != nullptr ? std::strtoull(env, nullptr, 0) : 0x5eedULL;
                            }(),
                            2, true};
  return cfg;
}
inline std::atomic<std::uint64_t>& launch_count() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

}  // namespace detail

// Where CUDA code would __trap(): the launch stops and throws std::runtime_error("trap: <msg>").
[[noreturn]] inline void trap(const std::string& msg) {
  if (detail::t_cta == nullptr) throw std::runtime_error("trap: " + msg);
  throw detail::Trap{msg};
}

// The current CTA's dynamic shared memory (128-byte aligned, poisoned with 0xFF bytes at the start of every CTA).
inline unsigned char* dynamic_smem() { return detail::cta().smem; }

// The device's opt-in maximum of dynamic shared memory per block (default: 227 KiB, an H100/H200), which bounds what
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) accepts and what later launches may use.
inline void set_max_dynamic_smem(std::size_t bytes) {
  if (bytes > kMaxDynamicSmem)
    throw std::runtime_error("molm_emu: dynamic shared memory limit " + std::to_string(bytes) + " B > " +
                             std::to_string(kMaxDynamicSmem) + " B (H100/H200 opt-in maximum)");
  detail::max_smem() = bytes;
}

// How later launches order their CTAs: a permutation drawn from `seed` and the launch's number (or, with shuffle =
// false, x fastest), taken by `concurrent_ctas` slots that run side by side, so that a kernel relying on the order of
// its CTAs, or racing between them, shows it. Default: seed MOLM_EMU_SEED (or a fixed one), 2 slots, shuffled.
inline void set_schedule(std::uint64_t seed, int concurrent_ctas, bool shuffle) {
  if (concurrent_ctas < 1 || concurrent_ctas > 8)
    throw std::runtime_error("molm_emu::set_schedule: concurrent_ctas must be 1..8");
  detail::schedule_config() = {seed, concurrent_ctas, shuffle};
  detail::launch_count() = 0;
}

// Runs kernel(args...) on grid x block threads. The CTAs run in a shuffled order (set_schedule), up to two at a time,
// each slot on block.x*block.y*block.z std::threads that are reused from CTA to CTA. Throws std::runtime_error on a
// bad configuration, a trap, an exception in the kernel, or a deadlock, after joining every thread.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, Kernel kernel, Args... args) {
  const std::size_t nthreads = std::size_t(block.x) * block.y * block.z;
  auto fail = [](const std::string& m) { throw std::runtime_error("molm_emu::launch: " + m); };
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0 || block.z > 64)
    fail("block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
         ") must have 32..1024 threads in whole warps (and z <= 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
         ") is out of CUDA's limits");
  const std::size_t limit =
      std::min(detail::func_smem_limit(reinterpret_cast<const void*>(kernel)), detail::max_smem().load());
  if (smem_bytes > limit)
    fail(std::to_string(smem_bytes) + " B of dynamic shared memory > the kernel's limit of " + std::to_string(limit) +
         " B (above " + std::to_string(kDefaultDynamicSmem) +
         " B a kernel needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first; device maximum " +
         std::to_string(detail::max_smem().load()) + " B)");

  const std::size_t ncta = std::size_t(grid.x) * grid.y * grid.z;
  detail::Schedule schedule;
  const detail::ScheduleConfig cfg = detail::schedule_config();
  schedule.seed = cfg.seed ^ (0x9e3779b97f4a7c15ULL * (detail::launch_count().fetch_add(1) + 1));
  schedule.order.resize(ncta);
  for (std::size_t i = 0; i < ncta; ++i) schedule.order[i] = i;
  if (cfg.shuffle) {
    std::mt19937_64 rng(schedule.seed);
    for (std::size_t i = ncta; i > 1; --i) std::swap(schedule.order[i - 1], schedule.order[rng() % i]);
  }
  const int nslots = static_cast<int>(std::min<std::size_t>(ncta, std::size_t(cfg.concurrent_ctas)));

  std::vector<std::unique_ptr<detail::Cta>> slots;
  for (int s = 0; s < nslots; ++s) {
    slots.emplace_back(new detail::Cta);
    detail::Cta& c = *slots.back();
    c.nthreads = static_cast<int>(nthreads);
    c.nwarps = c.nthreads / 32;
    c.warp.reset(new detail::Barrier[c.nwarps]);
    c.warp_live.assign(c.nwarps, 0xffffffffu);
    c.xchg.assign(std::size_t(c.nwarps) * 64, 0);
    c.smem_alloc.reset(new unsigned char[smem_bytes + 128]);
    c.smem = c.smem_alloc.get() + (128 - reinterpret_cast<std::uintptr_t>(c.smem_alloc.get()) % 128) % 128;
    c.smem_bytes = smem_bytes;
    c.grid = grid;
    c.schedule = &schedule;
    detail::take_next_locked(c);  // nslots <= ncta: every slot starts with a CTA
    detail::reset_cta_locked(c);
  }

  auto worker = [&](detail::Cta& c, int tid) {
    detail::t_cta = &c;
    detail::t_tid = tid;
    blockDim = block;
    gridDim = grid;
    threadIdx = {tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
    for (;;) {
      const std::size_t b = c.cta_index;
      blockIdx = {unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (std::size_t(grid.x) * grid.y))};
      detail::t_xchg = 0;
      detail::t_async.clear();
      std::string err;
      try {
        kernel(args...);
      } catch (const detail::Trap& t) {
        err = "trap: " + t.msg;
      } catch (const detail::Aborted&) {
      } catch (const std::exception& e) {
        err = std::string("exception in kernel: ") + e.what();
      } catch (...) {
        err = "unknown exception in kernel";
      }
      detail::t_async.clear();  // copies never waited for do not land (the CTA's shared memory is gone)
      if (!err.empty()) {
        std::lock_guard<std::mutex> lk(c.m);
        detail::abort_locked(c, err + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                                    std::to_string(blockIdx.z) + ", thread " + std::to_string(tid) + ")");
      }
      detail::exit_thread(c);
      if (detail::end_of_cta(c)) break;
    }
    detail::t_cta = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads * nslots);
  for (auto& slot : slots) {
    detail::Cta& c = *slot;
    int started = 0;
    try {
      for (; started < c.nthreads; ++started) threads.emplace_back(worker, std::ref(c), started);
    } catch (const std::system_error& e) {  // out of threads: stop the started ones (the gate counts only them)
      std::unique_lock<std::mutex> lk(c.m);
      detail::abort_locked(c, std::string("molm_emu::launch: could not start a thread: ") + e.what());
      schedule.stop = true;
      c.nthreads = started;
      if (c.done == c.nthreads) {
        c.stop = true;
        ++c.cta_gen;
        c.gate.notify_all();
      }
      break;
    }
  }
  for (auto& t : threads) t.join();
  for (auto& slot : slots)
    if (slot->aborted) throw std::runtime_error(slot->error);
}

}  // namespace molm_emu

// ---- cudaFuncSetAttribute (the dynamic shared-memory limit of one kernel) ------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      std::size_t(value) > molm_emu::detail::max_smem())
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(molm_emu::detail::func_attr_mutex());
  molm_emu::detail::func_smem_limits()[reinterpret_cast<const void*>(kernel)] = std::size_t(value);
  return cudaSuccess;
}

inline void __trap() { molm_emu::trap("__trap()"); }

// ---- barriers and warp collectives -----------------------------------------------------------------------------
inline void __syncthreads() {
  auto& c = molm_emu::detail::cta();
  molm_emu::detail::arrive_and_wait(c, c.block);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  auto& c = molm_emu::detail::cta();
  molm_emu::detail::warp_barrier(c);
  molm_emu::detail::check_mask(c, mask, "__syncwarp");
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return molm_emu::detail::shfl(mask, v, molm_emu::detail::Shfl::idx, src_lane, width, "__shfl_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return molm_emu::detail::shfl(mask, v, molm_emu::detail::Shfl::up, int(delta), width, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return molm_emu::detail::shfl(mask, v, molm_emu::detail::Shfl::down, int(delta), width, "__shfl_down_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return molm_emu::detail::shfl(mask, v, molm_emu::detail::Shfl::bfly, lane_mask, width, "__shfl_xor_sync");
}

// No divergence tracking: the lanes that had not exited at the warp's last barrier count as active.
inline unsigned __activemask() { return molm_emu::detail::live_lanes(molm_emu::detail::cta()); }

namespace molm_emu::detail {
// Lanes of mask (among those live) whose value v satisfies pred(v, this lane's v).
template <typename T, typename Pred>
unsigned vote(unsigned mask, const T& v, const char* fn, Pred pred) {
  Cta& c = cta();
  const std::uint64_t me = to_slot(v);
  const std::uint64_t* slots = exchange(c, me);
  const unsigned m = mask & check_mask(c, mask, fn);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((m >> l & 1u) && pred(slots[l], me)) r |= 1u << l;
  return r;
}
}  // namespace molm_emu::detail

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return molm_emu::detail::vote(mask, pred != 0, "__ballot_sync",
                                [](std::uint64_t s, std::uint64_t) { return s != 0; });
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {  // no lane votes false
  return molm_emu::detail::vote(mask, pred != 0, "__all_sync", [](std::uint64_t s, std::uint64_t) { return s == 0; }) ==
         0;
}
// Lanes (of the live lanes in mask) holding the same value as this lane.
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  return molm_emu::detail::vote(mask, v, "__match_any_sync", [](std::uint64_t s, std::uint64_t me) { return s == me; });
}

// ---- atomics (GCC builtins on plain memory) ---------------------------------------------------------------------
template <typename T>
T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  } else {  // float/double: compare-and-swap loop
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST), sum;
    do {
      sum = old + v;
    } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
  }
}
template <typename T>
T atomicMax(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMax: integers only");
  return __atomic_fetch_max(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicMin(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMin: integers only");
  return __atomic_fetch_min(p, v, __ATOMIC_SEQ_CST);
}

// ---- math and bit casts ----------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
// Round-to-nearest arithmetic that CUDA never contracts into an FMA (g++ does not contract without -mfma/-march).
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

namespace molm_emu::detail {
template <typename To, typename From>
To bits(const From& f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
}  // namespace molm_emu::detail
inline float __int_as_float(int v) { return molm_emu::detail::bits<float>(v); }
inline int __float_as_int(float v) { return molm_emu::detail::bits<int>(v); }
inline float __uint_as_float(unsigned v) { return molm_emu::detail::bits<float>(v); }
inline unsigned __float_as_uint(float v) { return molm_emu::detail::bits<unsigned>(v); }
inline double __hiloint2double(int hi, int lo) {
  return molm_emu::detail::bits<double>((std::uint64_t(unsigned(hi)) << 32) | unsigned(lo));
}
inline int __double2hiint(double d) { return int(molm_emu::detail::bits<std::uint64_t>(d) >> 32); }
inline int __double2loint(double d) { return int(unsigned(molm_emu::detail::bits<std::uint64_t>(d))); }

// ---- 16-bit floats (CUDA's bit layout; conversions are explicit, as in torch extensions) -----------------------
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
  __half x, y;
};

namespace molm_emu::detail {
inline unsigned short f2bf(float f) {  // round to nearest even; NaN -> canonical NaN 0x7fff (as CUDA)
  std::uint32_t u = bits<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);  // carries into the exponent give the right rounding, inf included
  return static_cast<unsigned short>(u >> 16);
}
inline unsigned short f2h(float f) {  // round to nearest even, subnormals, overflow to inf; NaN -> 0x7fff (as CUDA)
  const std::uint32_t x = bits<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u, u = x & 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7fff;
  if (u >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 (half-way above 65504)
  if (u <= 0x33000000u) return static_cast<unsigned short>(sign);            // <= 2^-25 (tie rounds to 0)
  std::uint32_t mant, rem, half;
  std::uint32_t h;
  if (u >= 0x38800000u) {  // normal result: keep 10 of 23 mantissa bits, rebias the exponent 127 -> 15
    mant = u & 0x7fffffu;
    h = (((u >> 23) - 112u) << 10) | (mant >> 13);
    rem = mant & 0x1fffu;
    half = 0x1000u;
  } else {  // subnormal result: units of 2^-24
    mant = (u & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(u >> 23);  // 14..24
    h = mant >> shift;
    rem = mant & ((1u << shift) - 1u);
    half = 1u << (shift - 1);
  }
  if (rem > half || (rem == half && (h & 1u))) ++h;  // a carry may reach the exponent: still the right encoding
  return static_cast<unsigned short>(sign | h);
}
inline float h2f(unsigned short h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits<float>(sign | 0x7f800000u | (m << 13));  // inf / NaN (payload kept)
  if (e == 0) {
    if (m == 0) return bits<float>(sign);
    int ee = 1;  // subnormal: normalise
    while (!(m & 0x400u)) {
      m <<= 1;
      --ee;
    }
    return bits<float>(sign | (std::uint32_t(ee + 112) << 23) | ((m & 0x3ffu) << 13));
  }
  return bits<float>(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace molm_emu::detail

inline __nv_bfloat16 __float2bfloat16(float f) { return {molm_emu::detail::f2bf(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(unsigned(b.__x) << 16); }
inline __half __float2half(float f) { return {molm_emu::detail::f2h(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return molm_emu::detail::h2f(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half(a), __float2half(b)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__low2float(v), __high2float(v)}; }
inline float2 __half22float2(__half2 v) { return {__low2float(v), __high2float(v)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }

namespace molm_emu::detail {
inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }
}  // namespace molm_emu::detail

// ---- async copies (cuda_pipeline primitives = cp.async) ---------------------------------------------------------
// Asynchronous as on the hardware: the destination is poisoned (0xFF bytes) when the copy is issued and receives the
// data only when __pipeline_wait_prior retires the copy's group, so reading a ring slot before its wait (a wrong wait
// count) sees NaNs, and a refill that races with readers of the slot clobbers what they read.
inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, std::size_t size_and_align,
                                    std::size_t zfill = 0) {
  auto& c = molm_emu::detail::cta();
  const std::size_t n = size_and_align;
  if (n != 4 && n != 8 && n != 16) molm_emu::trap("__pipeline_memcpy_async: size must be 4, 8 or 16");
  if (zfill > n) molm_emu::trap("__pipeline_memcpy_async: zfill > size");
  if (reinterpret_cast<std::uintptr_t>(dst_shared) % n != 0 ||
      (zfill < n && reinterpret_cast<std::uintptr_t>(src_global) % n != 0))
    molm_emu::trap("__pipeline_memcpy_async: pointers must be aligned to the copy size");
  auto* dst = static_cast<unsigned char*>(dst_shared);
  if (dst < c.smem || dst + n > c.smem + c.smem_bytes)
    molm_emu::trap("__pipeline_memcpy_async: the destination must lie in the CTA's shared memory");
  molm_emu::detail::AsyncCopy copy{dst, unsigned(n), unsigned(zfill), {}};
  std::memcpy(copy.data, src_global, n - zfill);  // no bytes are read when zfill == size
  std::memset(dst, 0xFF, n);
  molm_emu::detail::t_async.open.push_back(copy);
}
inline void __pipeline_commit() {
  auto& q = molm_emu::detail::t_async;
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}
// Waits until at most `prior` of this thread's committed groups are still in flight (cp.async.wait_group).
inline void __pipeline_wait_prior(std::size_t prior) {
  auto& q = molm_emu::detail::t_async;
  while (q.groups.size() > prior) {
    for (const auto& copy : q.groups.front()) {
      std::memcpy(copy.dst, copy.data, copy.n - copy.zfill);
      std::memset(copy.dst + (copy.n - copy.zfill), 0, copy.zfill);
    }
    q.groups.pop_front();
  }
}

// ---- WMMA 16x16x16: each lane holds its own share of the tile --------------------------------------------------
// A lane's x[] holds num_elements elements as on the hardware (8; 16 for fp16 matrix_a/b, each element twice), at the
// positions of the mma.sync m16n8k16 register layout. CUDA leaves that mapping unspecified: only elementwise work on
// x[] (the same i in fragments of one type) is portable, and a kernel that assumes a mapping, or indexes x[] past
// num_elements (a trap), fails here. matrix_a/b fragments also keep the whole tile as loaded, which mma_sync reads
// instead of gathering the other lanes' shares; changing their x[] is therefore not emulated (mma_sync traps).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
// x[] of a fragment: bounds-checked, so an index outside the lane's share traps.
template <typename T, int N>
struct Elements {
  T v[N];
  T& operator[](std::ptrdiff_t i) { return v[check(i)]; }
  const T& operator[](std::ptrdiff_t i) const { return v[check(i)]; }
  T* begin() { return v; }
  T* end() { return v + N; }
  const T* begin() const { return v; }
  const T* end() const { return v + N; }
  static std::ptrdiff_t check(std::ptrdiff_t i) {
    if (i < 0 || i >= N)
      molm_emu::trap("fragment x[" + std::to_string(i) + "]: a lane holds " + std::to_string(N) +
                     " elements of the 16x16 tile (num_elements), at positions CUDA leaves unspecified");
    return i;
  }
};

// Row-major index in the 16x16 tile of x[i] of `lane` (i < 8; fp16 matrix_a/b repeat x[0..7] in x[8..15]).
template <typename Use>
int tile_index(int lane, int i) {
  const int g = lane / 4, t = lane % 4;  // the m16n8k16 "group" and "thread in group"
  if constexpr (std::is_same_v<Use, matrix_a>) {
    return (g + 8 * (i / 2 % 2)) * 16 + 2 * t + i % 2 + 8 * (i / 4);  // rows m, columns k
  } else if constexpr (std::is_same_v<Use, matrix_b>) {
    const int j = i % 4;
    return (2 * t + j % 2 + 8 * (j / 2)) * 16 + g + 8 * (i / 4);  // rows k, columns n
  } else {
    const int j = i % 4;
    return (g + 8 * (j / 2)) * 16 + 8 * (i / 4) + 2 * t + j % 2;  // rows m, columns n
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "molm_emu: only the 16x16x16 WMMA shape is emulated");
  static_assert(std::is_same_v<Use, accumulator>
                    ? std::is_same_v<T, float> && std::is_void_v<Layout>
                    : (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) &&
                          (std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>),
                "molm_emu: fragments are bf16/fp16 matrix_a/b with a layout, or float accumulators without one");
  static constexpr bool kOperand = !std::is_same_v<Use, accumulator>;
  using element_type = T;
  static constexpr int num_elements = kOperand && std::is_same_v<T, __half> ? 16 : 8;  // as CUDA's mma.h
  detail::Elements<T, num_elements> x;
  T emu_tile[kOperand ? 256 : 1];  // matrix_a/b: the whole tile as loaded (row-major logical order)

  // Fills x[] from this fragment's whole-tile copy (matrix_a/b) or from tile(row-major index) (accumulators).
  template <typename F>
  void emu_share_from(F&& tile) {
    const int lane = molm_emu::detail::lane_id();
    for (int i = 0; i < num_elements; ++i) x.v[i] = tile(detail::tile_index<Use>(lane, i % 8));
  }
};

namespace detail {
template <typename T>
void check_ptr(const T* p, unsigned ldm, const char* fn) {
  if (ldm % (16 / sizeof(T)) != 0)
    molm_emu::trap(std::string(fn) + ": ldm = " + std::to_string(ldm) + " must be a multiple of " +
                   std::to_string(16 / sizeof(T)) + " elements (16 bytes)");
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    molm_emu::trap(std::string(fn) + ": the pointer must be 256-bit (32-byte) aligned");
}
inline std::size_t offset(int index, unsigned ldm, bool row) {
  const unsigned r = unsigned(index) / 16, c = unsigned(index) % 16;
  return row ? std::size_t(r) * ldm + c : std::size_t(c) * ldm + r;
}
// The whole tile of a matrix_a/b fragment, after checking that its x[] still holds what was loaded.
template <typename Use, typename T, typename L>
const T* operand_tile(const fragment<Use, 16, 16, 16, T, L>& f, const char* which) {
  const int lane = molm_emu::detail::lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    const T& tile = f.emu_tile[tile_index<Use>(lane, i % 8)];
    if (std::memcmp(&f.x.v[i], &tile, sizeof(T)) != 0)
      molm_emu::trap(std::string("mma_sync: elements of the ") + which +
                     " fragment were changed through x[] (not emulated for matrix_a/b)");
  }
  return f.emu_tile;
}
}  // namespace detail

template <typename Use, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  T t;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<V, T>)
    t = static_cast<T>(v);
  else if constexpr (std::is_same_v<T, __half>)
    t = __float2half(float(v));
  else
    t = __float2bfloat16(float(v));
  for (auto& e : f.x) e = t;
  for (auto& e : f.emu_tile) e = t;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::check_ptr(p, ldm, "load_matrix_sync");
  for (int i = 0; i < 256; ++i) f.emu_tile[i] = p[detail::offset(i, ldm, std::is_same_v<Layout, row_major>)];
  f.emu_share_from([&](int i) { return f.emu_tile[i]; });
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check_ptr(p, ldm, "load_matrix_sync");
  f.emu_share_from([&](int i) { return p[detail::offset(i, ldm, layout == mem_row_major)]; });
}

// Each lane stores its own elements after the warp converges (reads of the target issued before the call are done);
// other lanes see them only after a __syncwarp / __syncthreads.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_ptr(p, ldm, "store_matrix_sync");
  __syncwarp();
  const int lane = molm_emu::detail::lane_id();
  for (int i = 0; i < f.num_elements; ++i)
    p[detail::offset(detail::tile_index<accumulator>(lane, i), ldm, layout == mem_row_major)] = f.x.v[i];
}

// d = a * b + c with fp32 accumulation (k ascending) of the exact 16-bit products; d may alias c. Each lane computes
// its own elements of d from its own elements of c.
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  const T* ta = detail::operand_tile(a, "matrix_a");
  const T* tb = detail::operand_tile(b, "matrix_b");
  const int lane = molm_emu::detail::lane_id();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    const int e = detail::tile_index<accumulator>(lane, i), m = e / 16, n = e % 16;
    float acc = c.x.v[i];
    for (int k = 0; k < 16; ++k)
      acc += molm_emu::detail::to_float(ta[m * 16 + k]) * molm_emu::detail::to_float(tb[k * 16 + n]);
    out[i] = acc;
  }
  std::memcpy(d.x.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
