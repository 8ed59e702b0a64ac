// Text prompts for mcpm-run (see prompt.h).
#include "prompt.h"

#include <cstdio>

namespace mcpm {
namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

namespace {

const char* kConfig = "mlc-chat-config.json";

json::Array Arr(const json::Object& o, const char* key) {
  auto it = o.find(key);
  if (it == o.end()) return json::Array();
  if (auto a = (*it).second.try_cast<json::Array>()) return *a;
  throw Fail(std::string(kConfig) + ": conv_template." + key + " must be a list");
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

std::string Conversation::Render(const std::string& content) const {
  auto [before, after] = ImageTurn(content);
  return before + after;
}

std::pair<std::string, std::string> Conversation::ImageTurn(const std::string& content) const {
  std::string system = system_template;
  const std::string key = "{system_message}";
  for (size_t at = 0; (at = system.find(key, at)) != std::string::npos; at += system_message.size())
    system.replace(at, key.size(), system_message);
  return {system + user_role + role_content_sep,
          (strip_content ? StripPy(content) : content) + seps.at(0) + assistant_role + role_empty_sep};
}

Conversation ReadConversation(const json::Object& cfg) {
  Conversation c;
  auto it = cfg.find("conv_template");
  if (it == cfg.end()) {  // no chat template: the plain completion of exporter/chat.py
    c.prefix_ids = {static_cast<int32_t>(JsonInt(cfg, "bos_token_id", 1))};
    return c;
  }
  auto conv = (*it).second.try_cast<json::Object>();
  if (!conv) throw Fail(std::string(kConfig) + ": conv_template must be an object (MLC's Conversation)");
  auto str = [&](const char* key) { return JsonStr(*conv, {key}); };
  c.name = str("name"), c.system_template = str("system_template"), c.system_message = str("system_message");
  c.user_role = JsonStr(*conv, {"roles", "user"}), c.assistant_role = JsonStr(*conv, {"roles", "assistant"});
  c.role_content_sep = str("role_content_sep"), c.role_empty_sep = str("role_empty_sep");
  c.seps.clear();
  for (const ffi::Any& s : Arr(*conv, "seps")) c.seps.push_back(std::string(s.cast<ffi::String>()));
  if (c.seps.empty()) throw Fail(std::string(kConfig) + ": conv_template.seps is empty");
  for (const ffi::Any& i : Arr(*conv, "system_prefix_token_ids")) c.prefix_ids.push_back(static_cast<int32_t>(i.cast<int64_t>()));
  for (const ffi::Any& i : Arr(*conv, "stop_token_ids")) c.stop_ids.push_back(static_cast<int32_t>(i.cast<int64_t>()));
  auto opts = cfg.find("mcpm");
  if (opts != cfg.end())
    if (auto m = (*opts).second.try_cast<json::Object>()) {
      auto co = m->find("chat_options");
      if (co != m->end())
        if (auto flags = (*co).second.try_cast<json::Object>())
          for (auto& [key, val] : *flags) {
            if (auto b = val.try_cast<bool>()) {
              if (std::string(key.cast<ffi::String>()) == "strip_content") c.strip_content = *b;
              if (std::string(key.cast<ffi::String>()) == "image_first") c.image_first = *b;
            }
          }
    }
  return c;
}

std::string PromptText(const Options& o) {
  return o.has_prompt ? o.prompt : ReadFile(o.prompt_file, "--prompt-file");
}

TextPrompt MakeTextPrompt(const Options& o, const Conversation& conv, const SpTokenizer& tok, int32_t bos,
                          const std::string& text) {
  TextPrompt p;
  if (!o.image.empty()) {  // [bos] prefix image-block \n ids (vision.cc BuildPrompt)
    p.text = text;
    if (o.chat) {
      if (!conv.image_first) throw Fail("chat template '" + conv.name + "' takes no image; use --raw");
      auto [before, after] = conv.ImageTurn(text);
      p.prefix = tok.Encode(before), p.text = after;
    }
    p.ids = tok.Encode(p.text);
  } else if (o.chat) {
    p.text = conv.Render(text);
    p.ids = Concat(conv.prefix_ids, tok.Encode(p.text));
  } else {
    p.text = text;
    p.ids = Concat({bos}, tok.Encode(text));
  }
  return p;
}

void PrintTokenized(const Options& o, const json::Object& cfg) {
  if (!o.image.empty()) throw Fail("--tokenize-only takes no --image (see --plan-only)");
  SpTokenizer tok = SpTokenizer::Load(o.bundle + "/tokenizer.model");
  if (!o.text_prompt()) {
    std::printf("{\"prompt_ids\": %s, \"decoded\": %s}\n", JsonIds(o.prompt_ids).c_str(), JsonQuote(tok.Decode(o.prompt_ids)).c_str());
    return;
  }
  Conversation conv = ReadConversation(cfg);
  int32_t bos = static_cast<int32_t>(JsonInt(cfg, "bos_token_id", tok.bos_id()));
  std::string all = PromptText(o);
  std::vector<std::string> texts;
  if (o.each_line) {
    for (size_t at = 0; at < all.size();) {
      size_t nl = all.find('\n', at);
      if (nl == std::string::npos) nl = all.size();
      texts.push_back(all.substr(at, nl - at));
      at = nl + 1;
    }
  } else {
    texts.push_back(all);
  }
  for (const std::string& t : texts) {
    TextPrompt p = MakeTextPrompt(o, conv, tok, bos, t);
    std::printf("{\"prompt_ids\": %s, \"prompt_text\": %s, \"decoded\": %s}\n", JsonIds(p.ids).c_str(),
                JsonQuote(p.text).c_str(), JsonQuote(tok.Decode(p.ids)).c_str());
  }
}

}  // namespace mcpm
