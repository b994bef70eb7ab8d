// The walk over the group pieces of an element range, shared by the quantizer's CPU
// kernels and the ZeRO++ ones. A fragment, included inside the user's (anonymous)
// namespace after <cstdint>: quantize_cpu_impl.h includes it after its target switch,
// so each ISA gets its own copy compiled with its flags (see the note there), one
// that inlines the ISA's loop bodies.
#pragma once

// Calls f(group, begin, end) for each piece of [begin, end) that lies in one group.
template <typename F>
void for_each_group_segment(int64_t begin, int64_t end, int64_t group_size, const F& f) {
  for (int64_t g = begin / group_size; begin < end; ++g) {
    const int64_t seg_end = end < (g + 1) * group_size ? end : (g + 1) * group_size;
    f(g, begin, seg_end);
    begin = seg_end;
  }
}
