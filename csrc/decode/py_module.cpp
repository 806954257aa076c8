// py_module.cpp -- the Python module `sparse_attn._C` (setup.py's optional CUDA build). It holds no
// Python functions: importing it loads the shared library, whose TORCH_LIBRARY_FRAGMENT blocks
// (binding_cuda.cu) register the torch ops.
#include <Python.h>

static struct PyModuleDef sparse_attn_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                  "sparse_attn CUDA C++ kernels (torch ops)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparse_attn_c_module); }
