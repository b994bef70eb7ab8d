// The Python module object of qkit._C. Loading it runs the static op
// registrations of the other translation units; it exports nothing else, and
// uses only the limited API so one build serves every CPython >= 3.10.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "qkit's compiled kernels (ops live in torch.ops.qkit).",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
