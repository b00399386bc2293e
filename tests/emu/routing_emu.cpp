// Runs the routing kernels of csrc/cuda/routing.cuh (top-k + histogram, block scan, placement) on the CPU emulator
// (tests/test_routing_emu.py): the same kernels and launches as the CUDA build, on host buffers. The histogram
// workspace and the outputs start poisoned, so anything read before it is written shows up.
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "cuda/routing.cuh"

namespace {
namespace rt = molm::cuda::routing;
std::string g_error;

// The bits of a 16-bit element with the conversion to float that c10's types give the kernels on the GPU.
template <typename D>
struct Elem16 {
  D v;
  explicit operator float() const { return molm_emu::detail::to_float(v); }
};
static_assert(sizeof(Elem16<__half>) == 2 && sizeof(Elem16<__nv_bfloat16>) == 2);

template <typename T>
void run(const void* probs, int64_t n_tokens, int64_t n_experts, int64_t k, void* gates, int64_t* experts,
         int64_t* sorted_slots, int64_t* slot_positions, int64_t* offsets) {
  std::vector<int> hist(rt::hist_elems(n_tokens, n_experts), -12345);
  rt::launch_route(static_cast<const T*>(probs), n_tokens, n_experts, k, static_cast<T*>(gates), experts, hist.data(),
                   sorted_slots, slot_positions, offsets, nullptr);
}
}  // namespace

extern "C" {

const char* routing_emu_last_error() { return g_error.c_str(); }

// dtype: 0 bf16, 1 fp16, 2 fp32, 3 fp64; probs [N, E] contiguous. Returns 0, or -1 (message in
// routing_emu_last_error()).
int routing_emu(int dtype, const void* probs, int64_t n_tokens, int64_t n_experts, int64_t k, void* gates,
                int64_t* experts, int64_t* sorted_slots, int64_t* slot_positions, int64_t* offsets) {
  try {
    const auto go = [&](auto* tag) {
      run<std::remove_pointer_t<decltype(tag)>>(probs, n_tokens, n_experts, k, gates, experts, sorted_slots,
                                                slot_positions, offsets);
    };
    switch (dtype) {
      case 0: go(static_cast<Elem16<__nv_bfloat16>*>(nullptr)); break;
      case 1: go(static_cast<Elem16<__half>*>(nullptr)); break;
      case 2: go(static_cast<float*>(nullptr)); break;
      case 3: go(static_cast<double*>(nullptr)); break;
      default: g_error = "unknown dtype code " + std::to_string(dtype); return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

}  // extern "C"
