// io/torch_io: the bridge between safetensors files and torch tensors.
//
// tensor_view() is zero-copy where it can be: the tensor's storage is the file mapping itself,
// and the storage's deleter holds a shared_ptr to the SafetensorsFile, so the mapping lives as
// long as any tensor made from it. See Note [mapped tensors are read-only] in
// src/io/torch_io.cpp: write into such a tensor only after clone(). load_safetensors() returns
// owned copies and is the one to use for tensors that will be updated in place (adapters,
// optimizer state).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/io/safetensors.h"

namespace qlora::io {

// torch's dtype for a safetensors dtype (F8_E4M3 -> Float8_e4m3fn, F8_E5M2 -> Float8_e5m2).
at::ScalarType to_scalar_type(DType dtype);
// The safetensors dtype for a torch dtype; throws std::invalid_argument for types the format
// cannot hold (complex, quantized, unsigned wider than 8 bits, ...).
DType from_scalar_type(at::ScalarType type);

// A CPU tensor over the tensor's bytes in `file`: the mapping itself when the data pointer is
// aligned to the element size (every file the Python package or write_safetensors writes),
// else an aligned copy. BOOL tensors are checked to hold only 0 and 1 (InputError otherwise).
at::Tensor tensor_view(std::shared_ptr<const SafetensorsFile> file, const TensorInfo& info);

// Every tensor of the file, as owned contiguous CPU tensors (copies: safe to modify).
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

// Writes the tensors (any device or layout: moved to the CPU and made contiguous; dtype
// kept, bf16 and fp16 included) with write_safetensors: atomic, loadable by Python.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace qlora::io
