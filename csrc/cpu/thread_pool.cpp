// The pool of thread_pool.h. One region runs at a time. Its state is one 64-bit ticket
//   epoch (16 bits) | threads (8) | claims (20) | next claim (20)
// that workers advance with compare-and-swap, so a successful claim is always a claim of the current region (a
// worker holding a stale ticket just fails its CAS). The caller publishes the region's function before the ticket
// and does not return (or reuse the function slot) until every claim has reported done.
#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOLM_CPU_RELAX() _mm_pause()
#else
#define MOLM_CPU_RELAX() std::this_thread::yield()
#endif

namespace molm::cpu {
namespace {

constexpr int kClaimBits = 20, kThreadBits = 8;
constexpr uint64_t kClaimMask = (uint64_t(1) << kClaimBits) - 1, kThreadMask = (uint64_t(1) << kThreadBits) - 1;
constexpr int64_t kMaxClaims = int64_t(kClaimMask);
constexpr int kMaxThreads = int(kThreadMask);
// How long an idle worker polls for the next region before sleeping: regions of one decode step follow each other
// within tens of microseconds; longer spinning only takes the core from other processes.
constexpr auto kSpinTime = std::chrono::microseconds(50);
constexpr auto kWaitSlack = std::chrono::microseconds(20);  // waits below this are wake-up jitter, not a stall
constexpr int64_t kMaxSerialRegions = 1024;

struct Ticket {
  uint64_t bits;
  uint64_t epoch() const { return bits >> (2 * kClaimBits + kThreadBits); }
  int threads() const { return int((bits >> (2 * kClaimBits)) & kThreadMask); }
  int64_t claims() const { return int64_t((bits >> kClaimBits) & kClaimMask); }
  int64_t next() const { return int64_t(bits & kClaimMask); }
  static uint64_t make(uint64_t epoch, int threads, int64_t claims) {
    return (epoch << (2 * kClaimBits + kThreadBits)) | (uint64_t(threads) << (2 * kClaimBits)) |
           (uint64_t(claims) << kClaimBits);
  }
};

thread_local bool tl_in_region = false;  // true on pool workers and on a caller inside its region

class Pool {
 public:
  void run(int64_t n_items, int threads, c10::function_ref<void(int64_t, int)> item) {
    std::unique_lock<std::mutex> region(run_mutex_, std::try_to_lock);
    if (!region.owns_lock()) return run_inline(n_items, item);
    // Work is claimed in blocks of `per_claim` consecutive items (1 unless n_items exceeds the ticket's range).
    const int64_t per_claim = (n_items + kMaxClaims - 1) / kMaxClaims;
    const int64_t claims = (n_items + per_claim - 1) / per_claim;
    threads = static_cast<int>(std::min<int64_t>({int64_t(threads), int64_t(kMaxThreads), claims}));
    if (threads <= 1) return run_inline(n_items, item);
    if (serial_regions_left_ > 0) {  // backing off after a region that waited on a descheduled worker
      --serial_regions_left_;
      return run_inline(n_items, item);
    }
    start_workers(threads - 1);
    item_ = &item;
    n_items_ = n_items;
    per_claim_ = per_claim;
    done_.store(0, std::memory_order_relaxed);
    epoch_ = (epoch_ + 1) & 0xffff;
    ticket_.store(Ticket::make(epoch_, threads, claims), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      {
        std::lock_guard<std::mutex> lk(sleep_mutex_);
      }
      wake_.notify_all();
    }
    tl_in_region = true;
    const auto start = Clock::now();
    work(/*slot=*/0);
    const auto own_done = Clock::now();
    // Only claims already taken remain: wait for them (yielding, in case their thread needs this core).
    for (int spin = 0; done_.load(std::memory_order_acquire) < claims; ++spin) {
      if (spin < 2000)
        MOLM_CPU_RELAX();
      else
        std::this_thread::yield();
    }
    tl_in_region = false;
    adapt(own_done - start, Clock::now() - own_done);
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Waiting on workers longer than the caller's own share took means a worker was not running (busy machine) or
  // woke too late to help: parallel regions then cost more than they save, so the next ones run on the caller
  // alone, twice as many after each such region in a row (up to kMaxSerialRegions), before trying workers again.
  // Results do not change: the items are the same whoever runs them.
  void adapt(Clock::duration own, Clock::duration waited) {
    if (waited > own + kWaitSlack) {
      serial_backoff_ = std::min(kMaxSerialRegions, std::max<int64_t>(1, 2 * serial_backoff_));
      serial_regions_left_ = serial_backoff_;
    } else {
      serial_backoff_ /= 2;
    }
  }

  static void run_inline(int64_t n_items, c10::function_ref<void(int64_t, int)> item) {
    const bool outer = tl_in_region;
    tl_in_region = true;
    for (int64_t i = 0; i < n_items; ++i) item(i, 0);
    tl_in_region = outer;
  }

  // Claims and runs blocks of the current region until none is left (or the region is not this thread's to join).
  void work(int slot) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const Ticket tk{t};
      if (slot >= tk.threads() || tk.next() >= tk.claims()) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t lo = tk.next() * per_claim_, hi = std::min(n_items_, lo + per_claim_);
      for (int64_t i = lo; i < hi; ++i) (*item_)(i, slot);
      done_.fetch_add(1, std::memory_order_release);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void start_workers(int n) {
    while (static_cast<int>(n_workers_) < n) {
      const int slot = static_cast<int>(n_workers_) + 1;
      std::thread(&Pool::worker_loop, this, slot, epoch_).detach();  // lives as long as the process
      ++n_workers_;
    }
  }

  void worker_loop(int slot, uint64_t seen) {
    tl_in_region = true;
    for (;;) {
      seen = wait_for_region(seen);
      work(slot);
    }
  }

  // Returns the epoch of the next region after `seen`: polls for kSpinTime, then sleeps until woken.
  uint64_t wait_for_region(uint64_t seen) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    for (int spin = 0;; ++spin) {
      const uint64_t e = Ticket{ticket_.load(std::memory_order_acquire)}.epoch();
      if (e != seen) return e;
      if ((spin & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
      MOLM_CPU_RELAX();
    }
    std::unique_lock<std::mutex> lk(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t e = seen;
    wake_.wait(lk, [&] { return (e = Ticket{ticket_.load(std::memory_order_seq_cst)}.epoch()) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return e;
  }

  std::mutex run_mutex_;                                         // held by the caller of the running region
  int64_t serial_backoff_ = 0;                                   // under run_mutex_
  int64_t serial_regions_left_ = 0;                              // under run_mutex_
  uint64_t epoch_ = 0;                                           // under run_mutex_
  size_t n_workers_ = 0;                                         // under run_mutex_
  const c10::function_ref<void(int64_t, int)>* item_ = nullptr;  // the region's; published by ticket_
  int64_t n_items_ = 0, per_claim_ = 1;                          // the region's; published by ticket_
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};  // claims of the current region finished
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  Pool* fresh = new Pool();  // never deleted: its workers run until the process exits
  if (!g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;
    return *p;
  }
  return *fresh;
}

// A forked child has none of the parent's worker threads: it starts a new pool (the old one is left unused).
const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });

}  // namespace

int max_threads() { return std::max(1, at::get_num_threads()); }

void parallel_items(int64_t n_items, int threads, c10::function_ref<void(int64_t item, int slot)> item) {
  if (n_items <= 0) return;
  if (tl_in_region || threads <= 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) item(i, 0);
    return;
  }
  pool().run(n_items, threads, item);
}

}  // namespace molm::cpu
