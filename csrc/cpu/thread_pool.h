// molm's own CPU thread pool for the latency-critical kernels (decode GEMV, decode attention).
//
// Why not at::parallel_for: it splits the range statically over OpenMP threads that spin while they wait, so on a
// busy machine a region waits for a worker the OS has descheduled (measured on 2 shared cores: batch-1 decode 2-40x
// slower with 2 threads than with 1 while another process ran). Here the work items are claimed one at a time from
// a shared counter, and the calling thread claims them too: a worker that is not running simply claims nothing, and
// the caller only ever waits for items a worker has already started. Idle workers spin briefly, then sleep. A region
// that still had to wait on a worker longer than its own share took makes the next regions run serially (backing
// off exponentially), so on a busy machine the default thread count costs little more than one thread.
//
// Results never depend on the number of threads: callers define fixed work items, each writing its own outputs.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace molm::cpu {

// Threads a region may use now: at::get_num_threads(), so torch.set_num_threads applies.
int max_threads();

// Runs item(i, slot) once for every i in [0, n_items), on the calling thread and up to threads - 1 pool workers.
// slot in [0, threads) identifies the running thread, for per-thread scratch. Inside another region, or while
// another thread's region holds the pool, the items run inline, in order, with slot 0.
void parallel_items(int64_t n_items, int threads, c10::function_ref<void(int64_t item, int slot)> item);

}  // namespace molm::cpu
