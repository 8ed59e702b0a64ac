// mcpm-run's command line (--help text below) and shared file/JSON helpers.
#include "options.h"

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace mcpm {
namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

namespace {
const char* kUsage =
    "usage: mcpm-run --bundle DIR (--prompt TEXT | --prompt-file FILE | --prompt-ids 1,2,3 | --prompt-len N)\n"
    "                [--chat | --raw] [--gen-len M] [--threads T] [--lib PATH | --system-lib]\n"
    "                [--device cpu|opencl] [--logits-out FILE] [--tokenize-only [--each-line]] [--version]\n"
    "       --prompt / --prompt-file: text tokenized with the bundle's tokenizer.model; --chat (default): a user\n"
    "                turn of the bundle's chat template (mlc-chat-config.json conv_template), --raw: as is\n"
    "       vision bundles: --image FILE.ppm (binary PPM P6) [--plan-only] [--dump-images DIR]\n"
    "                [--features-out FILE]; the prompt is then the text after the image\n";

long ParseInt(const std::string& flag, const std::string& s, long lo) {
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || v < lo)
    throw Fail(flag + " expects an integer >= " + std::to_string(lo) + ", got '" + s + "'");
  return v;
}

}  // namespace

Options ParseArgs(int argc, char** argv, const char* version) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a == "--version") {
      std::printf("mcpm-run %s\n", version);
      std::exit(0);
    }
    if (a == "--plan-only") {
      o.plan_only = true;
      continue;
    }
    if (a == "--chat" || a == "--raw") {
      o.chat = a == "--chat", o.chat_flag = true;
      continue;
    }
    if (a == "--tokenize-only" || a == "--each-line") {
      (a == "--tokenize-only" ? o.tokenize_only : o.each_line) = true;
      continue;
    }
    if (a == "--system-lib") {  // as MLC's apps link libmodel_android.a: no dlopen, SystemLib(prefix)
      o.system_lib = true;
      continue;
    }
    if (i + 1 >= argc) throw Fail("unknown or incomplete argument '" + a + "' (see --help)");
    std::string v = argv[++i];
    if (a == "--bundle") {
      o.bundle = v;
    } else if (a == "--lib") {
      o.lib = v;
    } else if (a == "--logits-out") {
      o.logits_out = v;
    } else if (a == "--image") {
      o.image = v;
    } else if (a == "--dump-images") {
      o.dump_dir = v;
    } else if (a == "--features-out") {
      o.features_out = v;
    } else if (a == "--device") {
      if (v != "cpu" && v != "opencl") throw Fail("--device must be cpu or opencl, got '" + v + "'");
      o.device = v;
    } else if (a == "--prompt-ids") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ','))
        o.prompt_ids.push_back(static_cast<int32_t>(ParseInt("--prompt-ids", item, 0)));
    } else if (a == "--prompt") {
      o.prompt = v, o.has_prompt = true;
    } else if (a == "--prompt-file") {
      o.prompt_file = v;
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
  int prompts = !o.prompt_ids.empty() + (o.prompt_len >= 0) + o.has_prompt + !o.prompt_file.empty();
  if (prompts > 1) throw Fail("give only one of --prompt, --prompt-file, --prompt-ids or --prompt-len");
  if (o.image.empty() && (o.plan_only || !o.dump_dir.empty() || !o.features_out.empty()))
    throw Fail("--plan-only, --dump-images and --features-out need --image");
  if (o.image.empty() && prompts == 0)
    throw Fail("give exactly one of --prompt, --prompt-file, --prompt-ids or --prompt-len");
  if (o.chat_flag && !o.text_prompt()) throw Fail("--chat and --raw need --prompt or --prompt-file");
  if (o.tokenize_only && !o.text_prompt() && o.prompt_ids.empty())
    throw Fail("--tokenize-only needs --prompt, --prompt-file or --prompt-ids");
  if (o.each_line && !(o.tokenize_only && o.text_prompt())) throw Fail("--each-line needs --tokenize-only and a text prompt");
  return o;
}

bool Exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

std::string ReadFile(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail(what + " not found: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json::Object ReadJson(const std::string& path, const std::string& what) {
  ffi::String err;
  json::Value v = json::Parse(ReadFile(path, what), &err);
  if (!err.empty() || !v.as<json::Object>()) throw Fail(what + " is not a JSON object: " + path);
  return v.cast<json::Object>();
}

int64_t JsonInt(const json::Object& o, const char* key, int64_t dflt) {
  auto it = o.find(key);
  if (it == o.end()) return dflt;
  if (auto i = (*it).second.try_cast<int64_t>()) return *i;
  throw Fail(std::string("mlc-chat-config.json: '") + key + "' must be an integer");
}

// cfg[k0][k1]... as a string; "" when a step is missing or not of the expected type.
std::string JsonStr(const json::Object& cfg, const std::vector<std::string>& keys) {
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

std::string JsonQuote(const std::string& s) { return std::string(json::Stringify(ffi::String(s))); }

std::string JsonIds(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

}  // namespace mcpm
