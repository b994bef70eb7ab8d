// The kernels' work splitter, on torch's intra-op thread pool (so
// torch.set_num_threads governs qkit too).
#include <torch/csrc/stable/ops.h>

#include "qkit/kernels.h"

namespace qkit::cpu {

void parallel_for(int64_t begin, int64_t end, int64_t grain, void* ctx, RangeFn fn) {
  if (begin >= end) return;
  if (end - begin <= grain) {
    fn(ctx, begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, grain, [ctx, fn](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int64_t thread_count() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

}  // namespace qkit::cpu
