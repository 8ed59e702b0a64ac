// The bundle on disk (runner/bundle.h): tensor helpers, parameter shards and names, model and vision
// libraries, the vision config.
#include "bundle.h"

#include <sys/stat.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/extra/module.h>

#include <cstring>
#include <string>
#include <vector>

namespace mcpm {

namespace json = tvm::ffi::json;
using tvm::ffi::Tensor;

Tensor Empty(ffi::Shape shape, DLDataType dtype, DLDevice dev) {
  static ffi::Function f = Global("runtime.TVMTensorAllocWithScope");
  return f(shape, dtype, dev, nullptr).cast<Tensor>();
}

void CopyFromBytes(const Tensor& t, const void* data, int64_t nbytes) {
  static ffi::Function f = Global("runtime.TVMTensorCopyFromBytes");
  f(t, const_cast<void*>(data), nbytes);
}

void CopyToBytes(const Tensor& t, void* data, int64_t nbytes) {
  static ffi::Function f = Global("runtime.TVMTensorCopyToBytes");
  f(t, data, nbytes);
}

Tensor View(const Tensor& t, ffi::Shape shape) {
  static ffi::Function f = Global("runtime.TVMTensorCreateView");
  return f(t, shape, t.dtype(), static_cast<int64_t>(0)).cast<Tensor>();
}

// Parameter names in the order the model takes them: MLC's `_metadata` function when the
// library has one, otherwise the record order of params/tensor-cache.json.
static ffi::Array<ffi::String> ParamNames(ffi::Module vm, const json::Object& cache) {
  ffi::Array<ffi::String> names;
  if (auto meta = vm->GetFunction("_metadata", true)) {
    ffi::String text = (*meta)().cast<ffi::String>();
    json::Value v = json::Parse(text);
    if (auto obj = v.as<json::Object>()) {
      auto it = obj->find("params");
      if (it != obj->end()) {
        for (const ffi::Any& p : (*it).second.cast<json::Array>()) {
          if (auto str = p.try_cast<ffi::String>()) names.push_back(*str);
          else names.push_back(p.cast<json::Object>()["name"].cast<ffi::String>());
        }
        return names;
      }
    }
  }
  for (const ffi::Any& shard : cache["records"].cast<json::Array>())
    for (const ffi::Any& rec : shard.cast<json::Object>()["records"].cast<json::Array>())
      names.push_back(rec.cast<json::Object>()["name"].cast<ffi::String>());
  return names;
}

json::Object CheckShards(const std::string& params_dir) {
  std::string index = params_dir + "/tensor-cache.json";
  json::Object cache = ReadJson(index, "parameter index");
  auto it = cache.find("records");
  if (it == cache.end() || !(*it).second.as<json::Array>()) throw Fail("parameter index has no 'records': " + index);
  for (const ffi::Any& shard : (*it).second.cast<json::Array>()) {
    json::Object s = shard.cast<json::Object>();
    std::string path = params_dir + "/" + std::string(s["dataPath"].cast<ffi::String>());
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) throw Fail("parameter shard missing: " + path);
    int64_t want = s["nbytes"].cast<int64_t>();
    if (st.st_size != want)
      throw Fail("parameter shard " + path + " is " + std::to_string(st.st_size) + " bytes, index says " + std::to_string(want));
  }
  return cache;
}

std::string FindLib(const Options& o, const json::Object& cfg) {
  if (!o.lib.empty()) {
    if (!Exists(o.lib)) throw Fail("model library not found: " + o.lib);
    return o.lib;
  }
  std::vector<std::string> rels = {JsonStr(cfg, {"mcpm", "libs", o.device, "so"}), "lib/" + o.device + "/model.so",
                                   "lib/model.so", "model.so"};
  for (const std::string& rel : rels)
    if (!rel.empty() && Exists(o.bundle + "/" + rel)) return o.bundle + "/" + rel;
  throw Fail("no model library for device " + o.device + " in bundle " + o.bundle + " (looked for mlc-chat-config.json "
             "mcpm.libs." + o.device + ".so, lib/" + o.device + "/model.so, lib/model.so, model.so; or pass --lib)");
}

std::string LibPrefix(const Options& o, const json::Object& cfg) {
  std::string p = JsonStr(cfg, {"mcpm", "libs", o.device, "prefix"});
  if (!p.empty()) return p;
  std::string lib = JsonStr(cfg, {"model_lib"});
  return lib.empty() ? "" : lib + "_";
}

static ffi::Module LoadLib(const std::string& lib) {
  try {
    return ffi::Module::LoadFromFile(lib);
  } catch (const ffi::Error& e) {
    throw Fail("cannot load model library " + lib + ": " + std::string(e.message()));
  }
}

Vm LoadVm(const std::string& lib, const std::string& prefix, DLDevice dev) {
  ffi::Module dso = lib.empty() ? Global("ffi.SystemLib")(ffi::String(prefix)).cast<ffi::Module>() : LoadLib(lib);
  ffi::Module exe = dso;
  auto load_exe = exe->GetFunction("vm_load_executable", true);
  if (!load_exe) {  // a system library: loading it registered its symbols under the prefix
    exe = Global("ffi.SystemLib")(ffi::String(prefix)).cast<ffi::Module>();
    load_exe = exe->GetFunction("vm_load_executable", true);
  }
  if (!load_exe && lib.empty()) throw Fail("no system library with prefix '" + prefix + "' is linked into this program");
  if (!load_exe) throw Fail("not a Relax VM library (no vm_load_executable): " + lib);
  Vm v{dso, (*load_exe)().cast<ffi::Module>(), lib.empty() ? "system-lib " + prefix : lib};
  (*v.vm->GetFunction("vm_initialization", false))(static_cast<int>(dev.device_type), 0, 2, static_cast<int>(kDLCPU), 0, 2);
  return v;
}

ffi::Array<Tensor> LoadParams(const Vm& v, const std::string& dir, const json::Object& cache, DLDevice dev) {
  ffi::Array<ffi::String> names = ParamNames(v.vm, cache);
  Global("vm.builtin.tensor_cache.load")(dir, static_cast<int>(dev.device_type), 0);
  auto params = Global("vm.builtin.param_array_from_cache_by_name")(names).cast<ffi::Array<Tensor>>();
  Global("vm.builtin.tensor_cache.clear")();
  return params;
}

VisionBundle ReadVision(const Options& o, const json::Object& cfg) {
  VisionBundle vb;
  vb.dir = o.bundle + "/vision";
  std::string path = vb.dir + "/vision-config.json";
  if (!Exists(path)) throw Fail("--image needs a vision bundle, " + path + " is missing");
  json::Object vc = ReadJson(path, "vision config");
  auto obj = [&](const json::Object& parent, const char* key) {
    auto it = parent.find(key);
    if (it == parent.end() || !(*it).second.as<json::Object>()) throw Fail(path + ": no '" + key + "' object");
    return (*it).second.cast<json::Object>();
  };
  auto num = [&](const json::Object& parent, const char* key) -> double {
    auto it = parent.find(key);
    if (it != parent.end()) {
      if (auto b = (*it).second.as<bool>()) return *b;
      if (auto d = (*it).second.try_cast<double>()) return *d;
    }
    throw Fail(path + ": '" + key + "' missing or not a number");
  };
  json::Object c = obj(vc, "config"), t = obj(vc, "tokens");
  mcpm::VisionSettings& s = vb.s;
  s.version = num(c, "version"), s.patch = num(c, "patch"), s.pos_grid = num(c, "pos_grid"), s.hidden = num(c, "hidden");
  s.query_num = num(c, "query_num"), s.image_size = num(c, "image_size"), s.scale_resolution = num(c, "scale_resolution");
  s.max_slice_nums = num(c, "max_slice_nums"), s.slicing = num(c, "slicing") != 0;
  s.mean = static_cast<float>(num(c, "mean")), s.std = static_cast<float>(num(c, "std"));
  if (s.patch < 1 || s.pos_grid < 1 || s.hidden < 4 || s.query_num < 1 || s.scale_resolution < 1 || s.max_slice_nums < 1)
    throw Fail(path + ": config has a non-positive size");
  std::string resize = JsonStr(vc, {"slicing", "resize"}), order = JsonStr(vc, {"slicing", "resize_pass_order"});
  if (resize != "PIL bicubic") throw Fail(path + ": slicing.resize '" + resize + "' is not 'PIL bicubic'");
  if (!order.empty() && order != "pillow<13" && order != "pillow>=13")
    throw Fail(path + ": slicing.resize_pass_order '" + order + "' is not 'pillow<13' or 'pillow>=13'");
  s.pillow13_order = order == "pillow>=13";  // absent: bundles from before the field, Pillow < 13
  mcpm::ImageTokens& k = vb.tok;
  k.im_start = num(t, "im_start"), k.im_end = num(t, "im_end"), k.slice_start = num(t, "slice_start");
  k.slice_end = num(t, "slice_end"), k.unk = num(t, "unk");
  k.bos = t.find("bos") != t.end() ? static_cast<int32_t>(num(t, "bos")) : static_cast<int32_t>(JsonInt(cfg, "bos_token_id", -1));
  auto nl = t.find("newline");
  if (nl == t.end() || !(*nl).second.as<json::Array>()) throw Fail(path + ": tokens.newline must be a list of ids");
  for (const ffi::Any& id : (*nl).second.cast<json::Array>()) k.newline.push_back(static_cast<int32_t>(id.cast<int64_t>()));
  vb.function = JsonStr(vc, {"function"});
  vb.prefix = JsonStr(vc, {"system_lib_prefix"});
  std::string rel = JsonStr(vc, {"libs", o.device, "so"});
  if (rel.empty()) rel = "vision/lib/" + o.device + "/vision.so";
  vb.lib = o.bundle + "/" + rel;
  if (!s.slicing && s.version < 2) {  // V1: the resampler's key positions for the fixed grid
    std::string file = JsonStr(vc, {"key_pos", "file"});
    if (file.empty()) throw Fail(path + ": a version 1 vision config needs key_pos.file");
    std::string bytes = ReadFile(vb.dir + "/" + file, "V1 key position table");
    vb.key_pos.resize(bytes.size() / 4);
    std::memcpy(vb.key_pos.data(), bytes.data(), vb.key_pos.size() * 4);
  }
  return vb;
}

}  // namespace mcpm
