// The fused_attention torch ops and the Python module attention._C.
//
// Importing attention._C loads this library, whose static initializers register the op schemas
// below and the kernels of each device (CPU here, CUDA in cuda/binding.cpp when built). The module
// itself is empty, made with CPython's limited API alone (no pybind11), so py_limited_api builds work.
#include <Python.h>
#include <torch/library.h>

#include "cpu/attention_cpu.h"
#include "cpu/decode_cpu.h"
#include "cpu/isa.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Registers the fused_attention torch ops.", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fused_attention, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, Tensor? key_padding_mask,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
      " int window_left, int window_right, float softcap, Tensor? alibi_slopes,"
      " float dropout_p, int dropout_seed, int dropout_offset) -> (Tensor o, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float softmax_scale,"
      " Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
      " int window_left, int window_right, float softcap, Tensor? alibi_slopes,"
      " float dropout_p, int dropout_seed, int dropout_offset) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decoding from a KV cache (meaning in checks.h, check_kvcache_inputs): forward only, the key axis
  // split num_splits ways; the parts come back unmerged (attention/merge.py merges them).
  m.def(
      "fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? block_table, bool causal,"
      " float softmax_scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes,"
      " int num_splits) -> (Tensor o_parts, Tensor lse_parts)");
  // The instruction set of the CPU kernels' tile products (cpu/isa.h): the one in use, after switching
  // to `isa` where that is given.
  m.def("cpu_isa(str? isa=None) -> str", [](std::optional<std::string> isa) {
    if (isa.has_value()) fused_attention::set_cpu_isa(*isa);
    return fused_attention::cpu_isa_name(fused_attention::cpu_isa());
  });
}

TORCH_LIBRARY_IMPL(fused_attention, CPU, m) {
  m.impl("fwd", &fused_attention::attention_forward_cpu);
  m.impl("bwd", &fused_attention::attention_backward_cpu);
  m.impl("fwd_kvcache", &fused_attention::attention_forward_kvcache_cpu);
}
