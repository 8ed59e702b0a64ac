// mcpm-run's text prompts (--prompt / --prompt-file): the bundle's chat template (MLC's Conversation in
// mlc-chat-config.json, rendered as exporter/chat.py renders it) and tokenizer.model (tokenizer.cc).
#pragma once

#include <tvm/ffi/extra/json.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "options.h"
#include "tokenizer.h"

namespace mcpm {

// conv_template of mlc-chat-config.json (+ mcpm.chat_options: what MLC's Conversation has no field for).
struct Conversation {
  std::string name = "plain", system_template = "{system_message}", system_message, user_role, assistant_role;
  std::string role_content_sep, role_empty_sep;
  std::vector<std::string> seps{""};
  std::vector<int32_t> prefix_ids, stop_ids;  // system_prefix_token_ids (BOS), stop_token_ids
  bool strip_content = false, image_first = false;

  // ChatTemplate.format_turns([("user", content)]): system, user role, content, separator, assistant role.
  std::string Render(const std::string& content) const;
  // ChatTemplate.image_turn(content): the turn's text before the image placeholder and after its "\n".
  std::pair<std::string, std::string> ImageTurn(const std::string& content) const;
};

Conversation ReadConversation(const tvm::ffi::json::Object& cfg);

struct TextPrompt {
  std::string text;             // what was tokenized (chat: the rendered turn; image: the text after the image)
  std::vector<int32_t> prefix;  // image prompts: ids before the image (chat: the user role), after BOS
  std::vector<int32_t> ids;     // text prompts: the whole prompt, BOS included; image prompts: ids after it
};

// The prompt text of --prompt TEXT or --prompt-file FILE (the file's bytes as they are).
std::string PromptText(const Options& o);
TextPrompt MakeTextPrompt(const Options& o, const Conversation& conv, const SpTokenizer& tok, int32_t bos,
                          const std::string& text);
// --tokenize-only: print {"prompt_ids", "prompt_text", "decoded"} (one line per prompt line with
// --each-line; --prompt-ids: only the ids and their decoding) and load no model.
void PrintTokenized(const Options& o, const tvm::ffi::json::Object& cfg);

}  // namespace mcpm
