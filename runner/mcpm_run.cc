// mcpm-run: load an mcpm-export TVM bundle on the device, prefill a prompt, decode greedily and
// print one JSON object with timings. Any error: one "mcpm-run: error: ..." line, exit 1.
//
// Bundle layout (docs/DESIGN.md): mlc-chat-config.json, params/tensor-cache.json +
// params/params_shard_*.bin, and a Relax VM model library (.so) with the functions
// embed / prefill / decode / create_tir_paged_kv_cache.
#include <sys/stat.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef MCPM_RUN_BUILD_ID
#define MCPM_RUN_BUILD_ID "dev"
#endif
static const char* kVersion = "0.1.0+" MCPM_RUN_BUILD_ID;

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;
using tvm::ffi::Tensor;

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

struct Fail : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string bundle, lib, device = "cpu", logits_out;
  std::vector<int32_t> prompt_ids;
  long prompt_len = -1, gen_len = 16;
  int threads = 0;
};

static const char* kUsage =
    "usage: mcpm-run --bundle DIR (--prompt-ids 1,2,3 | --prompt-len N) [--gen-len M]\n"
    "                [--threads T] [--lib PATH] [--device cpu|opencl] [--logits-out FILE] [--version]\n";

static long ParseInt(const std::string& flag, const std::string& s, long lo) {
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo)
    throw Fail(flag + " expects an integer >= " + std::to_string(lo) + ", got '" + s + "'");
  return v;
}

static Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a == "--version") {
      std::printf("mcpm-run %s\n", kVersion);
      std::exit(0);
    }
    if (i + 1 >= argc) throw Fail("unknown or incomplete argument '" + a + "' (see --help)");
    std::string v = argv[++i];
    if (a == "--bundle") {
      o.bundle = v;
    } else if (a == "--lib") {
      o.lib = v;
    } else if (a == "--logits-out") {
      o.logits_out = v;
    } else if (a == "--device") {
      if (v != "cpu" && v != "opencl") throw Fail("--device must be cpu or opencl, got '" + v + "'");
      o.device = v;
    } else if (a == "--prompt-ids") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ','))
        o.prompt_ids.push_back(static_cast<int32_t>(ParseInt("--prompt-ids", item, 0)));
    } else if (a == "--prompt-len") {
      o.prompt_len = ParseInt(a, v, 1);
    } else if (a == "--gen-len") {
      o.gen_len = ParseInt(a, v, 1);
    } else if (a == "--threads") {
      o.threads = static_cast<int>(ParseInt(a, v, 0));
    } else {
      throw Fail("unknown argument '" + a + "' (see --help)");
    }
  }
  if (o.bundle.empty()) throw Fail("--bundle DIR is required (see --help)");
  if (o.prompt_ids.empty() == (o.prompt_len < 0))
    throw Fail("give exactly one of --prompt-ids or --prompt-len");
  return o;
}

static bool Exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

static std::string ReadFile(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail(what + " not found: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

static json::Object ReadJson(const std::string& path, const std::string& what) {
  ffi::String err;
  json::Value v = json::Parse(ReadFile(path, what), &err);
  if (!err.empty() || !v.as<json::Object>()) throw Fail(what + " is not a JSON object: " + path);
  return v.cast<json::Object>();
}

static int64_t JsonInt(const json::Object& o, const char* key, int64_t dflt) {
  auto it = o.find(key);
  if (it == o.end()) return dflt;
  if (auto i = (*it).second.try_cast<int64_t>()) return *i;
  throw Fail(std::string("mlc-chat-config.json: '") + key + "' must be an integer");
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

// cfg[k0][k1]... as a string; "" when a step is missing or not of the expected type.
static std::string JsonStr(const json::Object& cfg, const std::vector<std::string>& keys) {
  ffi::Any cur = cfg;
  for (const std::string& k : keys) {
    auto obj = cur.try_cast<json::Object>();
    if (!obj) return "";
    auto it = obj->find(ffi::String(k));
    if (it == obj->end()) return "";
    cur = (*it).second;
  }
  auto str = cur.try_cast<ffi::String>();
  return str ? std::string(*str) : "";
}

// The model library: --lib, else mlc-chat-config.json "model_lib" (a path, or an object whose
// libs.<device>.so is one), else lib/<device>/model.so, lib/model.so, model.so.
static std::string FindLib(const Options& o, const json::Object& cfg) {
  if (!o.lib.empty()) {
    if (!Exists(o.lib)) throw Fail("model library not found: " + o.lib);
    return o.lib;
  }
  std::vector<std::string> rels = {JsonStr(cfg, {"model_lib"}), JsonStr(cfg, {"model_lib", "libs", o.device, "so"}),
                                   "lib/" + o.device + "/model.so", "lib/model.so", "model.so"};
  for (const std::string& rel : rels)
    if (!rel.empty() && Exists(o.bundle + "/" + rel)) return o.bundle + "/" + rel;
  throw Fail("no model library for device " + o.device + " in bundle " + o.bundle + " (looked for mlc-chat-config.json "
             "model_lib, lib/" + o.device + "/model.so, lib/model.so, model.so; or pass --lib)");
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

static int Run(const Options& o) {
  using clock = std::chrono::steady_clock;
  if (o.threads > 0) ::setenv("TVM_NUM_THREADS", std::to_string(o.threads).c_str(), 1);
  if (!Exists(o.bundle)) throw Fail("bundle directory not found: " + o.bundle);
  json::Object cfg = ReadJson(o.bundle + "/mlc-chat-config.json", "bundle config");
  int64_t vocab = JsonInt(cfg, "vocab_size", 0);
  int64_t ctx = JsonInt(cfg, "context_window_size", 4096);
  int64_t chunk = JsonInt(cfg, "prefill_chunk_size", 128);
  std::vector<int32_t> prompt = o.prompt_ids;
  if (prompt.empty()) {  // synthetic prompt: BOS then a fixed pseudo-random walk over the vocab
    if (vocab < 8) throw Fail("--prompt-len needs 'vocab_size' in mlc-chat-config.json");
    prompt.push_back(static_cast<int32_t>(JsonInt(cfg, "bos_token_id", 1)));
    for (long i = 1; i < o.prompt_len; ++i) prompt.push_back(static_cast<int32_t>(3 + (i * 37) % (vocab - 3)));
  }
  for (int32_t t : prompt)
    if (vocab > 0 && t >= vocab) throw Fail("prompt token id " + std::to_string(t) + " >= vocab_size " + std::to_string(vocab));
  int64_t total = static_cast<int64_t>(prompt.size()) + o.gen_len;
  if (total > ctx) throw Fail("prompt + gen-len = " + std::to_string(total) + " exceeds context_window_size " + std::to_string(ctx));
  std::string lib = FindLib(o, cfg);
  std::string params_dir = o.bundle + "/params";
  json::Object cache = CheckShards(params_dir);
  DLDevice dev{o.device == "cpu" ? kDLCPU : kDLOpenCL, 0};
  if (o.device == "opencl" && !ffi::Function::GetGlobal("device_api.opencl"))
    throw Fail("--device opencl: this TVM runtime was built without OpenCL");

  std::FILE* dump = nullptr;  // --logits-out: float32 [gen_len, vocab], the row each token came from
  if (!o.logits_out.empty() && !(dump = std::fopen(o.logits_out.c_str(), "wb")))
    throw Fail("cannot write --logits-out " + o.logits_out);
  auto t0 = clock::now();
  ffi::Module exe = LoadLib(lib);
  auto load_exe = exe->GetFunction("vm_load_executable", true);
  ffi::Module dso = exe;  // keeps the library dlopen-ed while its functions are in use
  if (!load_exe) {  // a system library: loading it registered its symbols under the prefix
    exe = Global("ffi.SystemLib")(ffi::String(JsonStr(cfg, {"model_lib", "system_lib_prefix"}))).cast<ffi::Module>();
    load_exe = exe->GetFunction("vm_load_executable", true);
  }
  if (!load_exe) throw Fail("not a Relax VM library (no vm_load_executable): " + lib);
  ffi::Module vm = (*load_exe)().cast<ffi::Module>();
  // devices: the model device, then the host; 2 = pooled allocator
  (*vm->GetFunction("vm_initialization", false))(static_cast<int>(dev.device_type), 0, 2, static_cast<int>(kDLCPU), 0, 2);
  auto need = [&](const char* name) {
    auto f = vm->GetFunction(name, false);
    if (!f) throw Fail(std::string("model library lacks VM function '") + name + "': " + lib);
    return *f;
  };
  ffi::Function f_embed = need("embed"), f_prefill = need("prefill"), f_decode = need("decode");
  ffi::Function f_create = need("create_tir_paged_kv_cache");
  ffi::Array<ffi::String> names = ParamNames(vm, cache);
  Global("vm.builtin.tensor_cache.load")(params_dir, static_cast<int>(dev.device_type), 0);
  ffi::Array<Tensor> params =
      Global("vm.builtin.param_array_from_cache_by_name")(names).cast<ffi::Array<Tensor>>();
  Global("vm.builtin.tensor_cache.clear")();
  int64_t page = 16, max_len = (total + page - 1) / page * page;
  ffi::Any kv = f_create(ffi::Shape({1}), ffi::Shape({max_len}), ffi::Shape({chunk}), ffi::Shape({page}), ffi::Shape({0}));
  ffi::Function f_add = Global("vm.builtin.kv_state_add_sequence");
  ffi::Function f_begin = Global("vm.builtin.kv_state_begin_forward");
  ffi::Function f_end = Global("vm.builtin.kv_state_end_forward");
  f_add(kv, static_cast<int64_t>(0));
  auto t1 = clock::now();

  auto step = [&](const int32_t* ids, int64_t n, bool is_prefill) {
    Tensor in = Empty(ffi::Shape({n}), DLDataType{kDLInt, 32, 1}, dev);
    CopyFromBytes(in, ids, n * 4);
    Tensor emb = f_embed(in, params).cast<Tensor>();
    int64_t hidden = emb.shape()[emb.ndim() - 1];
    Tensor emb3 = View(emb, ffi::Shape({1, n, hidden}));
    f_begin(kv, ffi::Shape({0}), ffi::Shape({n}));
    Tensor logits = (is_prefill ? f_prefill : f_decode)(emb3, kv, params).cast<Tensor>();
    f_end(kv);
    return logits;
  };
  std::vector<float> buf;
  std::vector<int32_t> out;
  Tensor logits;
  for (size_t pos = 0; pos < prompt.size(); pos += chunk) {
    int64_t n = std::min<int64_t>(chunk, prompt.size() - pos);
    logits = step(prompt.data() + pos, n, true);
  }
  auto pick = [&](const Tensor& l) {
    int32_t t = Argmax(l, &buf);
    if (dump) std::fwrite(buf.data(), sizeof(float), buf.size(), dump);
    return t;
  };
  out.push_back(pick(logits));
  auto t2 = clock::now();
  for (long i = 1; i < o.gen_len; ++i) out.push_back(pick(step(&out.back(), 1, false)));
  auto t3 = clock::now();
  if (dump && std::fclose(dump) != 0) throw Fail("cannot write --logits-out " + o.logits_out);

  int threads = o.threads;
  if (auto nt = ffi::Function::GetGlobal("runtime.NumThreads")) threads = (*nt)().cast<int>();
  double load_ms = Ms(t0, t1), prefill_ms = Ms(t1, t2), decode_ms = Ms(t2, t3);
  long steps = o.gen_len - 1;
  std::printf("{\"runner_version\": \"%s\", \"device\": \"%s\", \"threads\": %d, \"prompt_len\": %zu, "
              "\"gen_len\": %ld, \"load_ms\": %.3f, \"ttft_ms\": %.3f, \"prefill_tok_s\": %.3f, "
              "\"decode_tok_s\": %.3f, \"decode_steps\": %ld, \"peak_rss_kb\": %ld, \"tokens\": [",
              kVersion, o.device.c_str(), threads, prompt.size(), o.gen_len, load_ms, prefill_ms,
              prompt.size() * 1000.0 / prefill_ms, steps > 0 ? steps * 1000.0 / decode_ms : 0.0, steps,
              PeakRssKb());
  for (size_t i = 0; i < out.size(); ++i) std::printf(i ? ", %d" : "%d", out[i]);
  std::printf("]}\n");
  return 0;
}

static std::string OneLine(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
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
