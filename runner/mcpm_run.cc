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

#include "bundle.h"
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
using mcpm::CheckShards, mcpm::CopyFromBytes, mcpm::CopyToBytes, mcpm::Empty, mcpm::FindLib, mcpm::Global, mcpm::LibPrefix;
using mcpm::LoadParams, mcpm::LoadVm, mcpm::ReadVision, mcpm::View, mcpm::VisionBundle, mcpm::Vm;
using mcpm::Exists, mcpm::Fail, mcpm::JsonInt, mcpm::JsonStr, mcpm::Options, mcpm::ReadFile, mcpm::ReadJson;

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
