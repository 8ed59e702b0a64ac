// SentencePiece BPE for mcpm-run (see tokenizer.h). Written from SentencePiece's documented behaviour
// (model proto, normalizer, BPE encode with frozen user-defined pieces and score-ordered merges, byte
// fallback, decode); checked id for id against the sentencepiece Python package by tests/test_runner_tokenizer.py.
#include "tokenizer.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <stdexcept>

namespace mcpm {
namespace {

using Err = std::runtime_error;
const char kSpace[] = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace symbol
const char kReplacement[] = "\xEF\xBF\xBD";

// One UTF-8 character at s[pos]: its length, 0 when the bytes there are not valid UTF-8 (strict:
// no overlong forms, no surrogates, nothing above U+10FFFF).
size_t Utf8Len(const std::string& s, size_t pos, uint32_t* cp = nullptr) {
  auto b = [&](size_t i) { return static_cast<uint8_t>(s[pos + i]); };
  auto trail = [&](size_t i) { return pos + i < s.size() && (b(i) & 0xC0) == 0x80; };
  size_t n = s.size() - pos;
  uint32_t c;
  size_t len;
  if (b(0) < 0x80) {
    c = b(0), len = 1;
  } else if (n >= 2 && (b(0) & 0xE0) == 0xC0 && trail(1)) {
    c = ((b(0) & 0x1Fu) << 6) | (b(1) & 0x3Fu), len = 2;
    if (c < 0x80) return 0;
  } else if (n >= 3 && (b(0) & 0xF0) == 0xE0 && trail(1) && trail(2)) {
    c = ((b(0) & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu), len = 3;
    if (c < 0x800) return 0;
  } else if (n >= 4 && (b(0) & 0xF8) == 0xF0 && trail(1) && trail(2) && trail(3)) {
    c = ((b(0) & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu), len = 4;
    if (c < 0x10000) return 0;
  } else {
    return 0;
  }
  if ((c >= 0xD800 && c < 0xE000) || c > 0x10FFFF) return 0;
  if (cp) *cp = c;
  return len;
}

// Protocol buffer wire format: just what a ModelProto needs (varints, fixed32, length-delimited).
struct Wire {
  const std::string* buf;
  size_t pos, end;
  bool Done() const { return pos >= end; }
  uint64_t Varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= end) throw Err("truncated varint");
      uint8_t byte = static_cast<uint8_t>((*buf)[pos++]);
      v |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
    throw Err("varint too long");
  }
  // Next field: (number, wire type); for type 2 *sub is its payload, for 0 / 5 *value the value.
  std::pair<uint32_t, int> Next(Wire* sub, uint64_t* value) {
    uint64_t key = Varint();
    int type = static_cast<int>(key & 7);
    if (type == 0) {
      *value = Varint();
    } else if (type == 5 || type == 1) {
      size_t n = type == 5 ? 4 : 8;
      if (end - pos < n) throw Err("truncated fixed field");
      uint64_t v = 0;
      for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>((*buf)[pos + i])) << (8 * i);
      *value = v, pos += n;
    } else if (type == 2) {
      uint64_t n = Varint();
      if (n > end - pos) throw Err("truncated length-delimited field");
      *sub = Wire{buf, pos, pos + static_cast<size_t>(n)};
      pos += static_cast<size_t>(n);
    } else {
      throw Err("unsupported wire type " + std::to_string(type));
    }
    return {static_cast<uint32_t>(key >> 3), type};
  }
  std::string Str() const { return buf->substr(pos, end - pos); }
};

struct Pair {  // a candidate merge of symbols[left] and symbols[right]
  int left, right;
  float score;
  size_t size;
};
struct PairOrder {  // higher score first; equal scores: the leftmost first
  bool operator()(const Pair& a, const Pair& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

}  // namespace

SpTokenizer SpTokenizer::Load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Err("tokenizer not found: " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string buf = ss.str();
  SpTokenizer t;
  int model_type = 1;  // proto defaults: UNIGRAM, identity-free normalizer settings as below
  bool ws_suffix = false;
  std::string norm_name, charsmap, rule_tsv;
  try {
    Wire top{&buf, 0, buf.size()}, sub{&buf, 0, 0}, f2{&buf, 0, 0};
    uint64_t v = 0;
    while (!top.Done()) {
      auto [num, type] = top.Next(&sub, &v);
      if (num == 1 && type == 2) {  // SentencePiece {1 piece, 2 score, 3 type}
        Piece p;
        while (!sub.Done()) {
          auto [n, ty] = sub.Next(&f2, &v);
          if (n == 1 && ty == 2) p.text = f2.Str();
          else if (n == 2 && ty == 5) { uint32_t bits = static_cast<uint32_t>(v); std::memcpy(&p.score, &bits, 4); }
          else if (n == 3 && ty == 0) p.type = static_cast<int>(v);
        }
        t.pieces_.push_back(p);
      } else if (num == 2 && type == 2) {  // TrainerSpec
        while (!sub.Done()) {
          auto [n, ty] = sub.Next(&f2, &v);
          if (ty == 2) { if (n == 44) t.unk_surface_ = f2.Str(); continue; }
          if (n == 3) model_type = static_cast<int>(v);
          else if (n == 24) ws_suffix = v != 0;
          else if (n == 35) t.byte_fallback_ = v != 0;
          else if (n == 40) t.unk_ = static_cast<int32_t>(v);
          else if (n == 41) t.bos_ = static_cast<int32_t>(v);
          else if (n == 42) t.eos_ = static_cast<int32_t>(v);
        }
      } else if (num == 3 && type == 2) {  // NormalizerSpec
        while (!sub.Done()) {
          auto [n, ty] = sub.Next(&f2, &v);
          if (ty == 2) {
            if (n == 1) norm_name = f2.Str();
            else if (n == 2) charsmap = f2.Str();
            else if (n == 6) rule_tsv = f2.Str();
            continue;
          }
          if (n == 3) t.add_dummy_prefix_ = v != 0;
          else if (n == 4) t.remove_extra_ws_ = v != 0;
          else if (n == 5) t.escape_ws_ = v != 0;
        }
      }
    }
  } catch (const Err& e) {
    throw Err(path + ": not a SentencePiece model (" + e.what() + ")");
  }
  if (t.pieces_.empty()) throw Err(path + ": not a SentencePiece model (no pieces)");
  std::string refuse;
  if (model_type != 2)
    refuse = std::string("model_type ") + (model_type == 1 ? "UNIGRAM" : model_type == 3 ? "WORD" : "CHAR") + " (only BPE)";
  else if (!charsmap.empty() || !rule_tsv.empty() || !(norm_name.empty() || norm_name == "identity"))
    refuse = "normalizer '" + norm_name + "' (only identity)";
  else if (ws_suffix)
    refuse = "treat_whitespace_as_suffix";
  if (!refuse.empty())
    throw Err(path + ": this runner's tokenizer does not implement " + refuse + "; tokenize on the host and use --prompt-ids");
  for (int32_t i = 0; i < t.size(); ++i) {
    const Piece& p = t.pieces_[i];
    bool mergeable = p.type == kNormal || p.type == kUserDefined || p.type == kUnused;
    (mergeable ? t.mergeable_ : t.reserved_).emplace(p.text, i);  // the first of duplicates wins
    if (p.type == kUserDefined) t.user_defined_.push_back(p.text);
  }
  if (t.unk_ < 0 || t.unk_ >= t.size()) throw Err(path + ": unk_id out of range");
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    t.byte_ids_[b] = t.PieceId(name);
  }
  return t;
}

int32_t SpTokenizer::PieceId(const std::string& piece) const {
  auto it = reserved_.find(piece);
  if (it != reserved_.end()) return it->second;
  it = mergeable_.find(piece);
  return it != mergeable_.end() ? it->second : unk_;
}

size_t SpTokenizer::UserDefinedMatch(const std::string& s, size_t pos) const {
  size_t best = 0;
  for (const std::string& u : user_defined_)
    if (u.size() > best && s.compare(pos, u.size(), u) == 0) best = u.size();
  return best;
}

// The identity normalizer: user-defined pieces pass as units; optional removal of leading, trailing and
// repeated spaces; the dummy-prefix space; spaces escaped to U+2581.
std::string SpTokenizer::Normalize(const std::string& text) const {
  size_t pos = 0;
  if (remove_extra_ws_)
    while (pos < text.size() && text[pos] == ' ' && !UserDefinedMatch(text, pos)) ++pos;
  if (pos == text.size()) return "";
  const std::string space = escape_ws_ ? kSpace : " ";
  std::string out = add_dummy_prefix_ ? space : "";
  bool prev_space = remove_extra_ws_;
  while (pos < text.size()) {
    size_t n = UserDefinedMatch(text, pos);
    if (!n) n = Utf8Len(text, pos);
    std::string unit = text.substr(pos, n);
    size_t skip = 0;
    while (prev_space && skip < unit.size() && unit[skip] == ' ') ++skip;
    if (skip < unit.size()) {
      for (size_t i = skip; i < unit.size(); ++i) {
        if (escape_ws_ && unit[i] == ' ') out += kSpace;
        else out += unit[i];
      }
      prev_space = unit.back() == ' ';
    }
    pos += n;
    if (!remove_extra_ws_) prev_space = false;
  }
  if (remove_extra_ws_)
    while (out.size() >= space.size() && out.compare(out.size() - space.size(), space.size(), space) == 0)
      out.resize(out.size() - space.size());
  return out;
}

void SpTokenizer::Resegment(const std::string& piece,
                            const std::unordered_map<std::string, std::pair<std::string, std::string>>& rev,
                            std::vector<int32_t>* out) const {
  int32_t id = PieceId(piece);
  auto r = rev.find(piece);
  if (pieces_[id].type == kUnused && r != rev.end()) {  // an unused piece: its two halves instead
    Resegment(r->second.first, rev, out);
    Resegment(r->second.second, rev, out);
  } else if (pieces_[id].type == kUnknown && byte_fallback_) {
    for (unsigned char b : piece) out->push_back(byte_ids_[b]);  // byte fallback: one <0xXX> per byte
  } else {
    out->push_back(id);
  }
}

std::vector<int32_t> SpTokenizer::Encode(const std::string& text) const {
  for (size_t i = 0; i < text.size();) {
    size_t n = Utf8Len(text, i);
    if (!n) throw Err("the prompt is not valid UTF-8 (byte offset " + std::to_string(i) + ")");
    i += n;
  }
  const std::string norm = Normalize(text);
  struct Symbol {
    int prev, next;
    size_t begin, len;
    bool frozen;  // a user-defined piece: never merged
  };
  std::vector<Symbol> sym;
  for (size_t pos = 0; pos < norm.size();) {
    size_t n = UserDefinedMatch(norm, pos);
    bool frozen = n > 0;
    if (!n) n = Utf8Len(norm, pos);
    int i = static_cast<int>(sym.size());
    sym.push_back({i - 1, pos + n < norm.size() ? i + 1 : -1, pos, n, frozen});
    pos += n;
  }
  std::priority_queue<Pair, std::vector<Pair>, PairOrder> agenda;
  std::unordered_map<std::string, std::pair<std::string, std::string>> rev;  // unused pieces' halves
  auto try_pair = [&](int l, int r) {
    if (l < 0 || r < 0 || sym[l].frozen || sym[r].frozen) return;
    std::string s = norm.substr(sym[l].begin, sym[l].len + sym[r].len);
    auto it = mergeable_.find(s);
    if (it == mergeable_.end()) return;
    agenda.push({l, r, pieces_[it->second].score, s.size()});
    if (pieces_[it->second].type == kUnused)
      rev[s] = {norm.substr(sym[l].begin, sym[l].len), norm.substr(sym[r].begin, sym[r].len)};
  };
  for (size_t i = 1; i < sym.size(); ++i) try_pair(static_cast<int>(i) - 1, static_cast<int>(i));
  while (!agenda.empty()) {
    Pair top = agenda.top();
    agenda.pop();
    Symbol &l = sym[top.left], &r = sym[top.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != top.size) continue;  // stale
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = top.left;
    r.len = 0;
    try_pair(l.prev, top.left);
    try_pair(top.left, l.next);
  }
  std::vector<int32_t> ids, one;
  bool prev_unk = false;
  for (int i = sym.empty() ? -1 : 0; i != -1; i = sym[i].next) {
    one.clear();
    Resegment(norm.substr(sym[i].begin, sym[i].len), rev, &one);
    for (int32_t id : one) {  // a run of unknown pieces becomes one unk id
      bool unk = id == unk_;
      if (!(unk && prev_unk)) ids.push_back(id);
      prev_unk = unk;
    }
  }
  return ids;
}

std::string SpTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text, bytes;
  auto flush = [&]() {  // pending byte pieces -> UTF-8, each invalid byte -> U+FFFD
    for (size_t i = 0; i < bytes.size();) {
      size_t n = Utf8Len(bytes, i);
      if (n) text += bytes.substr(i, n), i += n;
      else text += kReplacement, ++i;
    }
    bytes.clear();
  };
  // The dummy prefix: the first visible piece loses one leading U+2581; with remove_extra_whitespaces,
  // every piece does while the text is still empty.
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= size()) continue;
    const Piece& p = pieces_[id];
    if (p.type == kByte) {
      bytes += static_cast<char>(std::stoi(p.text.substr(3, 2), nullptr, 16));
      first = false;
      continue;
    }
    flush();  // a run of byte pieces ends at any other piece, control pieces included
    if (p.type == kControl) continue;
    std::string s = p.type == kUnknown ? unk_surface_ : p.text;
    if (first && p.type != kUnknown && (add_dummy_prefix_ || remove_extra_ws_) && s.compare(0, 3, kSpace) == 0) s.erase(0, 3);
    if (p.type != kUnknown)
      for (size_t at; (at = s.find(kSpace)) != std::string::npos;) s.replace(at, 3, " ");
    text += s;
    first = remove_extra_ws_ && text.empty();
  }
  flush();
  return text;
}

std::string StripPy(const std::string& s) {
  auto space = [&](size_t pos, size_t* len) {
    uint32_t c = 0;
    *len = Utf8Len(s, pos, &c);
    if (!*len) return false;
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
  };
  size_t b = 0, e = s.size(), n = 0;
  while (b < e && space(b, &n)) b += n;
  while (e > b) {  // step back to the start of the last character
    size_t k = e - 1;
    while (k > b && (static_cast<uint8_t>(s[k]) & 0xC0) == 0x80) --k;
    if (!space(k, &n) || k + n != e) break;
    e = k;
  }
  return s.substr(b, e - b);
}

}  // namespace mcpm
