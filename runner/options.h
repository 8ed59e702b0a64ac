// mcpm-run's command line and the small file/JSON helpers the runner's parts share. Errors: Fail (one line).
#pragma once

#include <tvm/ffi/extra/json.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mcpm {

struct Fail : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string bundle, lib, device = "cpu", logits_out, image, dump_dir, features_out;
  std::vector<int32_t> prompt_ids;
  long prompt_len = -1, gen_len = 16;
  int threads = 0;
  bool plan_only = false;
  bool system_lib = false;  // the model library is linked into this program: SystemLib(prefix) only
  // --prompt TEXT / --prompt-file FILE: text tokenized on the device (tokenizer.cc), as a user turn
  // of the bundle's chat template (chat, the default) or as is (--raw)
  std::string prompt, prompt_file;
  bool has_prompt = false, chat = true, chat_flag = false;
  bool tokenize_only = false, each_line = false;  // print the prompt's ids, load no model
  bool text_prompt() const { return has_prompt || !prompt_file.empty(); }
};

Options ParseArgs(int argc, char** argv, const char* version);

bool Exists(const std::string& path);
std::string ReadFile(const std::string& path, const std::string& what);
tvm::ffi::json::Object ReadJson(const std::string& path, const std::string& what);
int64_t JsonInt(const tvm::ffi::json::Object& o, const char* key, int64_t dflt);
// cfg[k0][k1]... as a string; "" when a step is missing or not of the expected type.
std::string JsonStr(const tvm::ffi::json::Object& cfg, const std::vector<std::string>& keys);
std::string JsonQuote(const std::string& s);  // a JSON string literal
std::string JsonIds(const std::vector<int32_t>& ids);  // [1, 2, 3]

}  // namespace mcpm
