// The bundle on disk, as mcpm-run reads it (bundle.cc): tensor helpers over the runtime's global functions
// (the TVM runtime C++ headers are not shipped in the wheels, only tvm::ffi's), the parameter shards,
// the model and vision libraries (a Relax VM each), vision/vision-config.json. Errors: Fail (one line).
#pragma once

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <string>
#include <vector>

#include "options.h"
#include "vision.h"

namespace mcpm {

namespace ffi = tvm::ffi;

inline ffi::Function Global(const char* name) { return ffi::Function::GetGlobalRequired(name); }
ffi::Tensor Empty(ffi::Shape shape, DLDataType dtype, DLDevice dev);
void CopyFromBytes(const ffi::Tensor& t, const void* data, int64_t nbytes);
void CopyToBytes(const ffi::Tensor& t, void* data, int64_t nbytes);
ffi::Tensor View(const ffi::Tensor& t, ffi::Shape shape);

// Every shard of <params_dir>/tensor-cache.json must exist with the size the index gives; the index.
tvm::ffi::json::Object CheckShards(const std::string& params_dir);
// The model library: --lib, else mlc-chat-config.json mcpm.libs.<device>.so, else
// lib/<device>/model.so, lib/model.so, model.so.
std::string FindLib(const Options& o, const tvm::ffi::json::Object& cfg);
// The system-lib prefix of the device's library: mcpm.libs.<device>.prefix, else MLC's rule for the
// string model_lib ("system://<model_lib>" loads SystemLib(model_lib + "_")).
std::string LibPrefix(const Options& o, const tvm::ffi::json::Object& cfg);

struct Vm {
  ffi::Module dso, vm;  // dso keeps the library dlopen-ed while its functions are in use
  std::string lib;
  ffi::Function Need(const char* name) const {
    auto f = vm->GetFunction(name, false);
    if (!f) throw Fail(std::string("model library lacks VM function '") + name + "': " + lib);
    return *f;
  }
};

// A Relax VM library (shared, or a system library whose symbols live under `prefix`), initialised
// for dev then the host (2 = pooled allocator).
Vm LoadVm(const std::string& lib, const std::string& prefix, DLDevice dev);
// The parameters in the order the model takes them (MLC's `_metadata`, else the index's record order).
ffi::Array<ffi::Tensor> LoadParams(const Vm& v, const std::string& dir, const tvm::ffi::json::Object& cache, DLDevice dev);

// vision/vision-config.json: settings, special token ids, library and (V1) key_pos.bin.
struct VisionBundle {
  VisionSettings s;
  ImageTokens tok;
  std::string dir, lib, prefix, function;
  std::vector<float> key_pos;
};

VisionBundle ReadVision(const Options& o, const tvm::ffi::json::Object& cfg);

}  // namespace mcpm
