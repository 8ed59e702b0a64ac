// mcpm-run's tokenizer: the bundle's SentencePiece tokenizer.model (a ModelProto, read from the protobuf
// wire format here, no protobuf library), BPE encoding and decoding as SentencePiece does them.
// Implemented: model_type BPE, identity normalizer (add_dummy_prefix, remove_extra_whitespaces,
// escape_whitespaces), user-defined pieces (matched first, never merged), byte fallback (<0xXX>),
// unused pieces (re-split). Anything else (unigram/word/char models, a normalization rule, whitespace as
// suffix) is refused at load with one error line. No TVM in here; errors are std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace mcpm {

class SpTokenizer {
 public:
  static SpTokenizer Load(const std::string& path);

  // Ids of `text` (UTF-8; invalid UTF-8 is refused), no BOS: SentencePieceProcessor.EncodeAsIds.
  std::vector<int32_t> Encode(const std::string& text) const;
  // SentencePieceProcessor.DecodeIds: control pieces vanish, byte pieces join into UTF-8 (invalid
  // bytes -> U+FFFD), U+2581 -> space, the dummy prefix's space dropped, unknown -> unk_surface.
  std::string Decode(const std::vector<int32_t>& ids) const;

  int32_t bos_id() const { return bos_; }
  int32_t eos_id() const { return eos_; }
  int32_t unk_id() const { return unk_; }
  int32_t size() const { return static_cast<int32_t>(pieces_.size()); }
  int32_t PieceId(const std::string& piece) const;  // unk_id when absent (SentencePiece's PieceToId)

 private:
  enum Type { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    int type = kNormal;
  };
  std::string Normalize(const std::string& text) const;
  size_t UserDefinedMatch(const std::string& s, size_t pos) const;  // longest match's length, 0: none
  void Resegment(const std::string& piece, const std::unordered_map<std::string, std::pair<std::string, std::string>>& rev,
                 std::vector<int32_t>* out) const;

  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int32_t> mergeable_;  // NORMAL, USER_DEFINED, UNUSED (SentencePiece's pieces_)
  std::unordered_map<std::string, int32_t> reserved_;   // CONTROL, UNKNOWN, BYTE
  std::vector<std::string> user_defined_;
  int32_t byte_ids_[256];
  int32_t unk_ = 0, bos_ = 1, eos_ = 2;
  bool byte_fallback_ = false, add_dummy_prefix_ = true, remove_extra_ws_ = true, escape_ws_ = true;
  std::string unk_surface_ = " \xE2\x81\x87 ";
};

// Python's str.strip(): leading/trailing Unicode whitespace (str.isspace) removed from UTF-8 text.
std::string StripPy(const std::string& s);

}  // namespace mcpm
