#include "kernel_options.h"

namespace molm {

KernelOptions& kernel_options() {
  static KernelOptions options;
  return options;
}

}  // namespace molm
