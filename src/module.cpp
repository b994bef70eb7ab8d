// The Python module object of qkit._C. Loading it runs the static op
// registrations of the other translation units; it exports nothing else, and
// uses only the limited API so one build serves every CPython >= 3.10.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "qkit's compiled kernels (ops live in torch.ops.qkit).",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

#ifdef QKIT_GLIBC_STUBS
// The release wheel is linked against glibc 2.28 stubs (docs/release-wheel.md), but compiled
// with this machine's newer headers, where libstdc++'s inline reference counting reads
// glibc's __libc_single_threaded (GLIBC_2.32) to skip atomics in single-threaded processes.
// glibc 2.28 has no such variable, so _C carries its own, hidden, always 0 ("not single
// threaded"): qkit's inline code then always uses the atomic path, which is correct in
// every process; libstdc++'s own code keeps reading the real one.
#include <sys/single_threaded.h>
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
#endif
