// mcpm-run: load an mcpm-export TVM bundle on the device, prefill a prompt, decode greedily and
// print one JSON object with timings. Any error: one "mcpm-run: error: ..." line, exit 1.
//
// Bundle layout (docs/DESIGN.md, MLC-LLM's flat layout): mlc-chat-config.json, tensor-cache.json +
// params_shard_*.bin next to it, and a Relax VM model library (.so) with MLC-LLM's functions, called
// the way MLC's engine calls them: embed -> [n, hidden] viewed [1, n, hidden] -> prefill / decode ->
// (logits, kv_cache), around kv_state_begin_forward / end_forward. With --image (vision bundles): the image
// path of vision.cc, vision/lib/<device>/vision.so's image_embed per encoded image, the features
// spliced over the <unk> rows of embed(ids) before prefill.
// Prompts: ready ids (--prompt-ids, --prompt-len) or text (--prompt, --prompt-file) tokenized here with the
// bundle's tokenizer.model (tokenizer.cc) as a user turn of its chat template (prompt.cc; --raw: as is).
#include <sys/stat.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "options.h"
#include "prompt.h"
#include "tokenizer.h"
#include "vision.h"

#ifndef MCPM_RUN_BUILD_ID
#define MCPM_RUN_BUILD_ID "dev"
#endif
static const char* kVersion = "0.1.0+" MCPM_RUN_BUILD_ID;

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;
using tvm::ffi::Tensor;
using mcpm::Exists, mcpm::Fail, mcpm::JsonInt, mcpm::JsonStr, mcpm::Options, mcpm::ReadFile, mcpm::ReadJson;

// Tensor helpers over the runtime's global functions (the TVM runtime C++ headers are not
// shipped in the wheels, only tvm::ffi's).
static ffi::Function Global(const char* name) { return ffi::Function::GetGlobalRequired(name); }

static Tensor Empty(ffi::Shape shape, DLDataType dtype, DLDevice dev) {
  static ffi::Function f = Global("runtime.TVMTensorAllocWithScope");
  return f(shape, dtype, dev, nullptr).cast<Tensor>();
}

static void CopyFromBytes(const Tensor& t, const void* data, int64_t nbytes) {
  static ffi::Function f = Global("runtime.TVMTensorCopyFromBytes");
  f(t, const_cast<void*>(data), nbytes);
}

static void CopyToBytes(const Tensor& t, void* data, int64_t nbytes) {
  static ffi::Function f = Global("runtime.TVMTensorCopyToBytes");
  f(t, data, nbytes);
}

static Tensor View(const Tensor& t, ffi::Shape shape) {
  static ffi::Function f = Global("runtime.TVMTensorCreateView");
  return f(t, shape, t.dtype(), static_cast<int64_t>(0)).cast<Tensor>();
}


static double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

static long PeakRssKb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return -1;
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

// Every shard of params/tensor-cache.json must exist with the size the index gives.
static json::Object CheckShards(const std::string& params_dir) {
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


// The model library: --lib, else mlc-chat-config.json mcpm.libs.<device>.so, else
// lib/<device>/model.so, lib/model.so, model.so.
static std::string FindLib(const Options& o, const json::Object& cfg) {
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

// The system-lib prefix of the device's library: mcpm.libs.<device>.prefix, else MLC's rule for the
// string model_lib ("system://<model_lib>" loads SystemLib(model_lib + "_")).
static std::string LibPrefix(const Options& o, const json::Object& cfg) {
  std::string p = JsonStr(cfg, {"mcpm", "libs", o.device, "prefix"});
  if (!p.empty()) return p;
  std::string lib = JsonStr(cfg, {"model_lib"});
  return lib.empty() ? "" : lib + "_";
}

static int32_t Argmax(const Tensor& logits, std::vector<float>* buf) {
  int64_t n = 1;
  for (int64_t d : logits.shape()) n *= d;
  buf->resize(n);
  DLDataType dt = logits.dtype();
  if (dt.code == kDLFloat && dt.bits == 32) {
    CopyToBytes(logits, buf->data(), n * 4);
  } else if (dt.code == kDLFloat && dt.bits == 16) {
    std::vector<uint16_t> h(n);
    CopyToBytes(logits, h.data(), n * 2);
    for (int64_t i = 0; i < n; ++i) {  // IEEE half -> float
      uint32_t s = (h[i] & 0x8000u) << 16, e = (h[i] >> 10) & 0x1f, m = h[i] & 0x3ff, f;
      if (e == 0 && m == 0) f = s;
      else if (e == 0) { e = 113; while (!(m & 0x400)) { m <<= 1; --e; } f = s | (e << 23) | ((m & 0x3ff) << 13); }
      else if (e == 31) f = s | 0x7f800000u | (m << 13);
      else f = s | ((e + 112) << 23) | (m << 13);
      std::memcpy(&(*buf)[i], &f, 4);
    }
  } else {
    throw Fail("logits must be float32 or float16");
  }
  int64_t vocab = logits.shape()[logits.ndim() - 1];
  buf->erase(buf->begin(), buf->end() - vocab);  // keep the last position's row
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if ((*buf)[i] > (*buf)[best]) best = i;
  return static_cast<int32_t>(best);
}

static ffi::Module LoadLib(const std::string& lib) {
  try {
    return ffi::Module::LoadFromFile(lib);
  } catch (const ffi::Error& e) {
    throw Fail("cannot load model library " + lib + ": " + std::string(e.message()));
  }
}

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
static Vm LoadVm(const std::string& lib, const std::string& prefix, DLDevice dev) {
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

static ffi::Array<Tensor> LoadParams(const Vm& v, const std::string& dir, const json::Object& cache, DLDevice dev) {
  ffi::Array<ffi::String> names = ParamNames(v.vm, cache);
  Global("vm.builtin.tensor_cache.load")(dir, static_cast<int>(dev.device_type), 0);
  auto params = Global("vm.builtin.param_array_from_cache_by_name")(names).cast<ffi::Array<Tensor>>();
  Global("vm.builtin.tensor_cache.clear")();
  return params;
}

// vision/vision-config.json: settings, special token ids, library and (V1) key_pos.bin.
struct VisionBundle {
  mcpm::VisionSettings s;
  mcpm::ImageTokens tok;
  std::string dir, lib, prefix, function;
  std::vector<float> key_pos;
};

static VisionBundle ReadVision(const Options& o, const json::Object& cfg) {
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

static uint16_t ToHalf(float f) {  // IEEE float -> half, round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
  int32_t e = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  if (((x >> 23) & 0xff) == 0xff) return sign | 0x7c00u | (mant ? 0x200u : 0);
  if (e >= 31) return sign | 0x7c00u;
  int shift = 13;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000u, shift = 14 - e, e = 0;
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) + (mant >> shift), rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

static std::string Floats(const std::vector<double>& v) {
  std::string s = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, i ? ", %.3f" : "%.3f", v[i]);
    s += buf;
  }
  return s + "]";
}

static int Run(const Options& o) {
  using clock = std::chrono::steady_clock;
  if (o.threads > 0) ::setenv("TVM_NUM_THREADS", std::to_string(o.threads).c_str(), 1);
  if (!Exists(o.bundle)) throw Fail("bundle directory not found: " + o.bundle);
  json::Object cfg = ReadJson(o.bundle + "/mlc-chat-config.json", "bundle config");
  int64_t vocab = JsonInt(cfg, "vocab_size", 0);
  int64_t ctx = JsonInt(cfg, "context_window_size", 4096);
  int64_t chunk = JsonInt(cfg, "prefill_chunk_size", 128);
  if (o.tokenize_only) {
    mcpm::PrintTokenized(o, cfg);
    return 0;
  }
  std::vector<int32_t> prompt = o.prompt_ids;
  if (o.prompt_len > 0) {  // synthetic prompt: [BOS] then a fixed pseudo-random walk over the vocab
    if (vocab < 8) throw Fail("--prompt-len needs 'vocab_size' in mlc-chat-config.json");
    if (o.image.empty()) prompt.push_back(static_cast<int32_t>(JsonInt(cfg, "bos_token_id", 1)));
    for (long i = 1; static_cast<long>(prompt.size()) < o.prompt_len; ++i)
      prompt.push_back(static_cast<int32_t>(3 + (i * 37) % (vocab - 3)));
  }
  std::optional<mcpm::SpTokenizer> tok;  // --prompt / --prompt-file: tokenized here
  mcpm::Conversation conv;
  mcpm::TextPrompt text;
  if (o.text_prompt()) {
    tok = mcpm::SpTokenizer::Load(o.bundle + "/tokenizer.model");
    conv = mcpm::ReadConversation(cfg);
    text = mcpm::MakeTextPrompt(o, conv, *tok, static_cast<int32_t>(JsonInt(cfg, "bos_token_id", tok->bos_id())),
                                mcpm::PromptText(o));
    prompt = text.ids;
  }
  const bool vision = !o.image.empty();
  VisionBundle vb;
  mcpm::Plan plan;
  std::vector<mcpm::Image> images;
  std::vector<int64_t> starts;
  double prep_ms = 0;
  if (vision) {  // decode, plan and resize on the device; the prompt becomes [bos] image-block \n text
    vb = ReadVision(o, cfg);
    auto p0 = clock::now();
    mcpm::Image img = mcpm::ReadPpm(o.image);
    plan = mcpm::PlanImage(img.w, img.h, vb.s);
    prompt = mcpm::BuildPrompt(plan, vb.tok, text.prefix, prompt, &starts);
    if (!o.plan_only || !o.dump_dir.empty()) images = mcpm::SliceImages(img, plan, vb.s.pillow13_order);
    prep_ms = Ms(p0, clock::now());
    for (size_t k = 0; k < images.size() && !o.dump_dir.empty(); ++k) {  // for verification
      std::string base = o.dump_dir + "/image-" + std::to_string(k);
      mcpm::WritePpm(base + ".ppm", images[k]);
      mcpm::EncoderInputs in = mcpm::MakeInputs(images[k], vb.s, vb.key_pos);
      std::ofstream f(base + ".inputs.bin", std::ios::binary);
      for (auto* v : {&in.patches, &in.pos_interp, &in.key_pos})
        f.write(reinterpret_cast<const char*>(v->data()), static_cast<std::streamsize>(v->size() * 4));
      if (!f) throw Fail("cannot write " + base + ".inputs.bin");
    }
    if (o.plan_only) {
      std::printf("{\"image\": {\"width\": %d, \"height\": %d}, \"plan\": %s, \"prompt_tokens\": %zu, \"prompt_ids\": %s}\n",
                  img.w, img.h, plan.Json().c_str(), prompt.size(), mcpm::JsonIds(prompt).c_str());
      return 0;
    }
  }
  for (int32_t t : prompt)
    if (vocab > 0 && t >= vocab) throw Fail("prompt token id " + std::to_string(t) + " >= vocab_size " + std::to_string(vocab));
  int64_t total = static_cast<int64_t>(prompt.size()) + o.gen_len;
  if (total > ctx) throw Fail("prompt + gen-len = " + std::to_string(total) + " exceeds context_window_size " + std::to_string(ctx));
  std::string lib = o.system_lib ? "" : FindLib(o, cfg);
  std::string params_dir = o.bundle;  // MLC: the tensor cache sits next to mlc-chat-config.json
  json::Object cache = CheckShards(params_dir);
  json::Object vcache = vision ? CheckShards(vb.dir + "/params") : json::Object();
  if (vision && !Exists(vb.lib)) throw Fail("vision library not found for device " + o.device + ": " + vb.lib);
  DLDevice dev{o.device == "cpu" ? kDLCPU : kDLOpenCL, 0};
  if (o.device == "opencl" && !ffi::Function::GetGlobal("device_api.opencl"))
    throw Fail("--device opencl: this TVM runtime was built without OpenCL");

  std::FILE* dump = nullptr;  // --logits-out: float32 [gen_len, vocab], the row each token came from
  if (!o.logits_out.empty() && !(dump = std::fopen(o.logits_out.c_str(), "wb")))
    throw Fail("cannot write --logits-out " + o.logits_out);
  auto t0 = clock::now();
  Vm model = LoadVm(lib, LibPrefix(o, cfg), dev);
  ffi::Function f_embed = model.Need("embed"), f_prefill = model.Need("prefill"), f_decode = model.Need("decode");
  ffi::Function f_create = model.Need("create_tir_paged_kv_cache");
  ffi::Array<Tensor> params = LoadParams(model, params_dir, cache, dev);
  int64_t page = 16, max_len = (total + page - 1) / page * page;
  ffi::Any kv = f_create(ffi::Shape({1}), ffi::Shape({max_len}), ffi::Shape({chunk}), ffi::Shape({page}), ffi::Shape({0}));
  ffi::Function f_add = Global("vm.builtin.kv_state_add_sequence");
  ffi::Function f_begin = Global("vm.builtin.kv_state_begin_forward");
  ffi::Function f_end = Global("vm.builtin.kv_state_end_forward");
  f_add(kv, static_cast<int64_t>(0));
  auto tv = clock::now();
  std::optional<Vm> vvm;
  ffi::Array<Tensor> vparams;
  ffi::Function f_image;
  if (vision) {
    vvm = LoadVm(vb.lib, vb.prefix, dev);
    f_image = vvm->Need(vb.function.empty() ? "image_embed" : vb.function.c_str());
    vparams = LoadParams(*vvm, vb.dir + "/params", vcache, dev);
  }
  auto t1 = clock::now();

  // vision: image_embed per encoded image (thumbnail, then slices row by row) -> [query_num, hidden]
  const int64_t Q = vb.s.query_num, D = vb.s.hidden;
  std::vector<float> feats(images.size() * Q * D);
  std::vector<double> enc_ms;
  auto to_dev = [&](const std::vector<float>& v, int64_t rows) {
    Tensor t = Empty(ffi::Shape({rows, static_cast<int64_t>(v.size()) / rows}), DLDataType{kDLFloat, 32, 1}, dev);
    CopyFromBytes(t, v.data(), static_cast<int64_t>(v.size()) * 4);
    return t;
  };
  for (size_t k = 0; k < images.size(); ++k) {
    auto e0 = clock::now();
    mcpm::EncoderInputs in = mcpm::MakeInputs(images[k], vb.s, vb.key_pos);
    Tensor out = f_image(to_dev(in.patches, in.n), to_dev(in.pos_interp, in.n), to_dev(in.key_pos, in.n), vparams).cast<Tensor>();
    DLDataType dt = out.dtype();
    if (out.numel() != Q * D || dt.code != kDLFloat || dt.bits != 32)
      throw Fail("vision function returned a tensor other than float32 [" + std::to_string(Q) + ", " + std::to_string(D) + "]: " + vb.lib);
    CopyToBytes(out, feats.data() + k * Q * D, Q * D * 4);
    enc_ms.push_back(Ms(e0, clock::now()));
  }
  auto t2 = clock::now();
  if (!o.features_out.empty()) {
    std::ofstream f(o.features_out, std::ios::binary);
    f.write(reinterpret_cast<const char*>(feats.data()), static_cast<std::streamsize>(feats.size() * 4));
    if (!f) throw Fail("cannot write --features-out " + o.features_out);
  }

  auto embed = [&](const int32_t* ids, int64_t n) {
    Tensor in = Empty(ffi::Shape({n}), DLDataType{kDLInt, 32, 1}, dev);
    CopyFromBytes(in, ids, n * 4);
    return f_embed(in, params).cast<Tensor>();
  };
  auto forward = [&](const Tensor& emb, int64_t n, bool is_prefill) {
    Tensor emb3 = View(emb, ffi::Shape({1, n, emb.shape()[emb.ndim() - 1]}));
    f_begin(kv, ffi::Shape({0}), ffi::Shape({n}));
    ffi::Any ret = (is_prefill ? f_prefill : f_decode)(emb3, kv, params);
    f_end(kv);
    auto tup = ret.try_cast<ffi::Array<ffi::Any>>();  // MLC's contract: (logits, kv_cache)
    if (!tup || tup->size() != 2) throw Fail("prefill/decode must return (logits, kv_cache): " + model.lib);
    return (*tup)[0].cast<Tensor>();
  };
  std::vector<float> buf;
  std::vector<int32_t> out;
  Tensor logits;
  if (!vision) {
    for (size_t pos = 0; pos < prompt.size(); pos += chunk) {
      int64_t n = std::min<int64_t>(chunk, prompt.size() - pos);
      logits = forward(embed(prompt.data() + pos, n), n, true);
    }
  } else {  // embed(ids) (scale_emb included), image features over the <unk> rows, chunked prefill
    int64_t n = static_cast<int64_t>(prompt.size());
    Tensor emb = embed(prompt.data(), n);
    DLDataType dt = emb.dtype();
    int64_t hidden = emb.shape()[emb.ndim() - 1], es = dt.bits / 8;
    if (hidden != D || dt.code != kDLFloat || (dt.bits != 32 && dt.bits != 16))
      throw Fail("embed returns hidden " + std::to_string(hidden) + " (float" + std::to_string(dt.bits) +
                 "), the vision features have hidden " + std::to_string(D));
    std::vector<uint8_t> host(n * hidden * es);
    CopyToBytes(emb, host.data(), static_cast<int64_t>(host.size()));
    for (size_t k = 0; k < starts.size(); ++k)
      for (int64_t r = 0; r < Q * D; ++r) {
        float v = feats[k * Q * D + r];
        uint8_t* dst = host.data() + (starts[k] * D + r) * es;
        if (es == 4) std::memcpy(dst, &v, 4);
        else { uint16_t h = ToHalf(v); std::memcpy(dst, &h, 2); }
      }
    for (int64_t pos = 0; pos < n; pos += chunk) {
      int64_t m = std::min<int64_t>(chunk, n - pos);
      Tensor part = Empty(ffi::Shape({m, hidden}), dt, dev);
      CopyFromBytes(part, host.data() + pos * hidden * es, m * hidden * es);
      logits = forward(part, m, true);
    }
  }
  auto pick = [&](const Tensor& l) {
    int32_t t = Argmax(l, &buf);
    if (dump) std::fwrite(buf.data(), sizeof(float), buf.size(), dump);
    return t;
  };
  out.push_back(pick(logits));
  auto t3 = clock::now();
  for (long i = 1; i < o.gen_len; ++i) out.push_back(pick(forward(embed(&out.back(), 1), 1, false)));
  auto t4 = clock::now();
  if (dump && std::fclose(dump) != 0) throw Fail("cannot write --logits-out " + o.logits_out);

  int threads = o.threads;
  if (auto nt = ffi::Function::GetGlobal("runtime.NumThreads")) threads = (*nt)().cast<int>();
  double load_ms = Ms(t0, t1), prefill_ms = Ms(t2, t3), decode_ms = Ms(t3, t4);
  long steps = o.gen_len - 1;
  std::printf("{\"runner_version\": \"%s\", \"device\": \"%s\", \"threads\": %d, \"prompt_len\": %zu, "
              "\"gen_len\": %ld, \"load_ms\": %.3f, \"ttft_ms\": %.3f, \"prefill_tok_s\": %.3f, "
              "\"decode_tok_s\": %.3f, \"decode_steps\": %ld, \"peak_rss_kb\": %ld, ",
              kVersion, o.device.c_str(), threads, prompt.size(), o.gen_len, load_ms, prefill_ms,
              prompt.size() * 1000.0 / prefill_ms, steps > 0 ? steps * 1000.0 / decode_ms : 0.0, steps,
              PeakRssKb());
  if (vision) {
    double enc_total = 0;
    for (double m : enc_ms) enc_total += m;
    std::printf("\"image\": {\"width\": %d, \"height\": %d}, \"plan\": %s, \"prompt_tokens\": %zu, "
                "\"image_prep_ms\": %.3f, \"vision_load_ms\": %.3f, \"vision_encode_ms\": %s, "
                "\"vision_encode_total_ms\": %.3f, ",
                plan.w, plan.h, plan.Json().c_str(), prompt.size(), prep_ms, Ms(tv, t1), Floats(enc_ms).c_str(), enc_total);
  }
  if (tok) {  // the generated text up to the first stop token (conv_template stop_token_ids, EOS)
    std::vector<int32_t> shown;
    for (int32_t t : out) {
      if (t == tok->eos_id() || std::find(conv.stop_ids.begin(), conv.stop_ids.end(), t) != conv.stop_ids.end()) break;
      shown.push_back(t);
    }
    std::printf("\"prompt_text\": %s, \"text\": %s, ", mcpm::JsonQuote(text.text).c_str(),
                mcpm::JsonQuote(tok->Decode(shown)).c_str());
  }
  std::printf("\"tokens\": %s}\n", mcpm::JsonIds(out).c_str());
  return 0;
}

static std::string OneLine(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

int main(int argc, char** argv) {
  try {
    return Run(mcpm::ParseArgs(argc, argv, kVersion));
  } catch (const Fail& e) {
    std::fprintf(stderr, "mcpm-run: error: %s\n", OneLine(e.what()).c_str());
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "mcpm-run: error: %s: %s\n", std::string(e.kind()).c_str(),
                 OneLine(std::string(e.message())).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mcpm-run: error: %s\n", OneLine(e.what()).c_str());
  }
  return 1;
}
