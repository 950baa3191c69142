// The kernels' thread pool, shared by every source file of the library (defined in qlinear.cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace llamarun_kernels {

// Run body(begin, end) over [0, n) in chunks of at least `grain` items, on the calling thread and the
// pool's helpers (at most llamarun.set_num_threads / torch.set_num_threads threads in all).
void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace llamarun_kernels
