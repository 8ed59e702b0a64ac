// mcpm-run's image path; see vision.h. Reference: exporter/vision/{slicing,preprocess}.py and PIL's
// Image.resize(BICUBIC). Built with -ffp-contract=off so the float arithmetic rounds like numpy's.
#include "vision.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <tuple>

namespace mcpm {

using Err = std::runtime_error;

// ---------------------------------------------------------------- PPM (P6, maxval 255)
Image ReadPpm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Err("--image " + path + ": cannot open (" + std::strerror(errno) + ")");
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const std::string hint = ": the runner reads binary PPM (P6, maxval 255) only; convert on the host "
                           "(see runner/README.md)";
  if (data.rfind("\x89PNG", 0) == 0) throw Err("--image " + path + ": PNG data, not a binary PPM" + hint);
  if (data.rfind("\xff\xd8", 0) == 0) throw Err("--image " + path + ": JPEG data, not a binary PPM" + hint);
  if (data.size() < 3 || data[0] != 'P' || data[1] != '6' || !std::isspace(static_cast<unsigned char>(data[2])))
    throw Err("--image " + path + ": not a binary PPM (no P6 header)" + hint);
  size_t pos = 2;
  long v[3];
  for (long& x : v) {  // width, height, maxval; whitespace and #-comments between them
    while (pos < data.size() && (std::isspace(static_cast<unsigned char>(data[pos])) || data[pos] == '#')) {
      if (data[pos] == '#') pos = data.find('\n', pos) == std::string::npos ? data.size() : data.find('\n', pos);
      else ++pos;
    }
    size_t start = pos;
    x = 0;
    while (pos < data.size() && std::isdigit(static_cast<unsigned char>(data[pos])) && x <= 1000000)
      x = x * 10 + (data[pos++] - '0');
    if (pos == start || x > 1000000) throw Err("--image " + path + ": bad PPM header (width, height, maxval)");
  }
  if (pos >= data.size() || !std::isspace(static_cast<unsigned char>(data[pos])))
    throw Err("--image " + path + ": bad PPM header (no whitespace after maxval)");
  ++pos;
  if (v[2] != 255) throw Err("--image " + path + ": PPM maxval " + std::to_string(v[2]) + ", only 255 is supported");
  if (v[0] < 1 || v[1] < 1 || v[0] > 32768 || v[1] > 32768)
    throw Err("--image " + path + ": PPM size " + std::to_string(v[0]) + "x" + std::to_string(v[1]) +
              " out of range (1..32768 per side)");
  size_t need = static_cast<size_t>(v[0]) * v[1] * 3;
  if (data.size() - pos < need)
    throw Err("--image " + path + ": truncated PPM: " + std::to_string(v[0]) + "x" + std::to_string(v[1]) +
              " needs " + std::to_string(need) + " bytes of pixels, the file has " + std::to_string(data.size() - pos));
  Image im;
  im.w = static_cast<int>(v[0]);
  im.h = static_cast<int>(v[1]);
  im.rgb.assign(data.begin() + pos, data.begin() + pos + need);
  return im;
}

void WritePpm(const std::string& path, const Image& im) {
  std::ofstream f(path, std::ios::binary);
  f << "P6\n" << im.w << " " << im.h << "\n255\n";
  f.write(reinterpret_cast<const char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  if (!f) throw Err("cannot write " + path);
}

// ---------------------------------------------------------------- slice plan (slicing.py)
// round() of Python 3 is round-half-to-even: nearbyint in the default rounding mode.
static int EnsureDivide(double length, int patch) {
  return std::max(static_cast<int>(std::nearbyint(length / patch)) * patch, patch);
}

static std::pair<int, int> FindBestResize(double w, double h, int scale, int patch, bool upscale) {
  if (w * h > static_cast<double>(scale) * scale || upscale) {
    double r = w / h;
    h = std::trunc(scale / std::sqrt(r));  // int() truncates
    w = std::trunc(h * r);
  }
  return {EnsureDivide(w, patch), EnsureDivide(h, patch)};
}

static std::pair<int, int> BestGrid(int w, int h, int multiple, int max_slices) {
  double log_ratio = std::log(static_cast<double>(w) / h), best_err = INFINITY;
  std::pair<int, int> best{1, 1};
  for (int n : {multiple - 1, multiple, multiple + 1}) {
    if (n == 1 || n > max_slices) continue;
    for (int cols = 1; cols <= n; ++cols) {
      if (n % cols) continue;
      double err = std::fabs(log_ratio - std::log(static_cast<double>(cols) / (n / cols)));
      if (err < best_err) best = {cols, n / cols}, best_err = err;
    }
  }
  return best;
}

Plan PlanImage(int w, int h, const VisionSettings& s) {
  if (w <= 0 || h <= 0) throw Err("image size " + std::to_string(w) + "x" + std::to_string(h) + " is not valid");
  Plan p;
  p.w = w, p.h = h, p.query_num = s.query_num, p.patch = s.patch;
  if (!s.slicing) {  // MiniCPM-V 1.0: one fixed square input
    p.thumb_w = p.thumb_h = s.image_size;
    return p;
  }
  int scale = s.scale_resolution;
  double ratio = static_cast<double>(w) * h / (static_cast<double>(scale) * scale);
  int multiple = static_cast<int>(std::min<double>(std::ceil(ratio), s.max_slice_nums));
  if (multiple <= 1) {
    std::tie(p.thumb_w, p.thumb_h) = FindBestResize(w, h, scale, s.patch, true);
    return p;
  }
  std::tie(p.thumb_w, p.thumb_h) = FindBestResize(w, h, scale, s.patch, false);
  std::tie(p.cols, p.rows) = BestGrid(w, h, multiple, s.max_slice_nums);
  int rw = EnsureDivide(w, p.cols), rh = EnsureDivide(h, p.rows);  // get_refine_size
  auto cell = FindBestResize(static_cast<double>(rw) / p.cols, static_cast<double>(rh) / p.rows, scale, s.patch, true);
  p.refine_w = cell.first * p.cols, p.refine_h = cell.second * p.rows;
  return p;
}

std::vector<std::pair<int, int>> Plan::Images() const {
  std::vector<std::pair<int, int>> out{{thumb_w, thumb_h}};
  for (int i = 0; i < cols * rows; ++i) out.emplace_back(refine_w / cols, refine_h / rows);
  return out;
}

std::string Plan::Json() const {
  auto pair = [](int a, int b) { return "[" + std::to_string(a) + ", " + std::to_string(b) + "]"; };
  auto imgs = Images();
  std::string grids;
  for (auto& [iw, ih] : imgs) grids += (grids.empty() ? "" : ", ") + pair(ih / patch, iw / patch);
  return "{\"size\": " + pair(w, h) + ", \"thumbnail\": " + pair(thumb_w, thumb_h) +
         ", \"grid\": " + (sliced() ? pair(cols, rows) : "null") +
         ", \"refine\": " + (sliced() ? pair(refine_w, refine_h) : "null") +
         ", \"slice\": " + (sliced() ? pair(refine_w / cols, refine_h / rows) : "null") +
         ", \"num_images\": " + std::to_string(imgs.size()) + ", \"patch_grids\": [" + grids +
         "], \"image_feature_tokens\": " + std::to_string(query_num * imgs.size()) + "}";
}

// ---------------------------------------------------------------- resize (PIL BICUBIC)
// PIL resamples separably: a horizontal pass to 8-bit rows, then a vertical pass, each output sample a
// fixed-point (22 fractional bits) weighted sum of the inputs under the a = -0.5 cubic, stretched by
// the downscale factor (antialiasing). A pass is skipped when that side keeps its size. The pass order
// matters (the intermediate is rounded to 8 bits): Pillow < 13 always goes horizontal first; Pillow 13
// (python-pillow/Pillow#9549) goes vertical first when the height shrinks by more than twice as many
// pixels as the width (rule measured against Pillow 13.0.0 on random sizes, every pixel equal).
static double Cubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

struct Taps {
  std::vector<int> first, count;
  std::vector<int32_t> weight;  // [out][ksize], fixed point
  int ksize = 0;
};

static constexpr int kBits = 22;

static Taps MakeTaps(int in, int out) {
  double scale = static_cast<double>(in) / out, stretch = std::max(scale, 1.0), support = 2.0 * stretch;
  double inv = 1.0 / stretch;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.weight.assign(static_cast<size_t>(out) * t.ksize, 0);
  std::vector<double> w(t.ksize);
  for (int o = 0; o < out; ++o) {
    double center = (o + 0.5) * scale;
    int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    int hi = std::min(static_cast<int>(center + support + 0.5), in);
    double total = 0.0;
    for (int j = lo; j < hi; ++j) total += (w[j - lo] = Cubic((j - center + 0.5) * inv));
    for (int j = lo; j < hi; ++j) {
      double k = total != 0.0 ? w[j - lo] / total : w[j - lo];
      t.weight[static_cast<size_t>(o) * t.ksize + (j - lo)] =
          static_cast<int32_t>(k < 0 ? -0.5 + k * (1 << kBits) : 0.5 + k * (1 << kBits));
    }
    t.first.push_back(lo);
    t.count.push_back(hi - lo);
  }
  return t;
}

static inline uint8_t Clip8(int32_t acc) {
  int v = acc >> kBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

static Image ResizeHorizontal(const Image& im, int w) {
  Taps t = MakeTaps(im.w, w);
  Image out{w, im.h, std::vector<uint8_t>(static_cast<size_t>(w) * im.h * 3)};
  for (int y = 0; y < im.h; ++y) {
    const uint8_t* row = &im.rgb[static_cast<size_t>(y) * im.w * 3];
    for (int x = 0; x < w; ++x) {
      const int32_t* k = &t.weight[static_cast<size_t>(x) * t.ksize];
      for (int c = 0; c < 3; ++c) {
        int32_t acc = 1 << (kBits - 1);
        for (int i = 0; i < t.count[x]; ++i) acc += row[(t.first[x] + i) * 3 + c] * k[i];
        out.rgb[(static_cast<size_t>(y) * w + x) * 3 + c] = Clip8(acc);
      }
    }
  }
  return out;
}

static Image ResizeVertical(const Image& im, int h) {
  Taps t = MakeTaps(im.h, h);
  size_t stride = static_cast<size_t>(im.w) * 3;
  Image out{im.w, h, std::vector<uint8_t>(stride * h)};
  for (int y = 0; y < h; ++y) {
    const int32_t* k = &t.weight[static_cast<size_t>(y) * t.ksize];
    for (size_t x = 0; x < stride; ++x) {
      int32_t acc = 1 << (kBits - 1);
      for (int i = 0; i < t.count[y]; ++i) acc += im.rgb[(t.first[y] + i) * stride + x] * k[i];
      out.rgb[y * stride + x] = Clip8(acc);
    }
  }
  return out;
}

Image Resize(const Image& im, int w, int h, bool pillow13_order) {
  if (w == im.w && h == im.h) return im;
  if (w == im.w) return ResizeVertical(im, h);
  if (h == im.h) return ResizeHorizontal(im, w);
  if (pillow13_order && h < im.h && im.h - h > 2 * (im.w - w)) return ResizeHorizontal(ResizeVertical(im, h), w);
  return ResizeVertical(ResizeHorizontal(im, w), h);
}

static Image Crop(const Image& im, int x0, int y0, int w, int h) {
  Image out{w, h, std::vector<uint8_t>(static_cast<size_t>(w) * h * 3)};
  for (int y = 0; y < h; ++y)
    std::memcpy(&out.rgb[static_cast<size_t>(y) * w * 3], &im.rgb[(static_cast<size_t>(y0 + y) * im.w + x0) * 3],
                static_cast<size_t>(w) * 3);
  return out;
}

std::vector<Image> SliceImages(const Image& im, const Plan& p, bool pillow13_order) {
  std::vector<Image> out{Resize(im, p.thumb_w, p.thumb_h, pillow13_order)};
  if (p.sliced()) {
    Image refined = Resize(im, p.refine_w, p.refine_h, pillow13_order);
    int cw = p.refine_w / p.cols, ch = p.refine_h / p.rows;
    for (int top = 0; top < p.refine_h; top += ch)
      for (int left = 0; left < p.refine_w; left += cw) out.push_back(Crop(refined, left, top, cw, ch));
  }
  return out;
}

// ---------------------------------------------------------------- encoder inputs (preprocess.py)
// aa_bicubic_matrix: [n_out, n_in] antialiased bicubic weights (float64, then float32).
static std::vector<float> AaBicubic(int n_in, int n_out) {
  std::vector<float> m(static_cast<size_t>(n_out) * n_in, 0.0f);
  if (n_in == n_out) {
    for (int i = 0; i < n_out; ++i) m[static_cast<size_t>(i) * n_in + i] = 1.0f;
    return m;
  }
  double scale = static_cast<double>(n_in) / n_out;
  double support = scale >= 1.0 ? 2.0 * scale : 2.0, invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  std::vector<double> w(n_in);
  for (int i = 0; i < n_out; ++i) {
    double center = scale * (i + 0.5), total = 0.0;
    int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    int hi = std::min(static_cast<int>(center + support + 0.5), n_in);
    for (int j = lo; j < hi; ++j) total += (w[j] = Cubic((j - center + 0.5) * invscale));
    for (int j = lo; j < hi; ++j)
      m[static_cast<size_t>(i) * n_in + j] = static_cast<float>(total != 0.0 ? w[j] / total : w[j]);
  }
  return m;
}

// sincos_1d(dim, pos) for one position, appended to out: [sin(pos*omega), cos(pos*omega)], float32.
static void SinCos(int dim, float pos, float* out) {
  int half = dim / 2;
  for (int k = 0; k < half; ++k) {
    float omega = 1.0f / std::pow(10000.0f, static_cast<float>(k) / static_cast<float>(dim / 2.0));
    float x = pos * omega;
    out[k] = std::sin(x);
    out[half + k] = std::cos(x);
  }
}

EncoderInputs MakeInputs(const Image& im, const VisionSettings& s, const std::vector<float>& key_pos_fixed) {
  const int p = s.patch, P = s.pos_grid, D = s.hidden;
  if (im.w % p || im.h % p)
    throw Err("image " + std::to_string(im.w) + "x" + std::to_string(im.h) + " is not a multiple of the patch size");
  const int h = im.h / p, w = im.w / p, pp = p * p;
  EncoderInputs in;
  in.n = static_cast<int64_t>(h) * w;
  in.patches.resize(in.n * 3 * pp);
  for (int y = 0; y < im.h; ++y)
    for (int x = 0; x < im.w; ++x)
      for (int c = 0; c < 3; ++c) {
        float v = static_cast<float>(im.rgb[(static_cast<size_t>(y) * im.w + x) * 3 + c]) / 255.0f;
        size_t patch = static_cast<size_t>(y / p) * w + x / p;
        in.patches[patch * 3 * pp + c * pp + (y % p) * p + x % p] = (v - s.mean) / s.std;
      }
  std::vector<float> ah = AaBicubic(P, h), aw = AaBicubic(P, w);  // kron(ah, aw)
  in.pos_interp.resize(in.n * P * P);
  float* dst = in.pos_interp.data();
  for (int i = 0; i < h; ++i)
    for (int j = 0; j < w; ++j)
      for (int a = 0; a < P; ++a)
        for (int b = 0; b < P; ++b) *dst++ = ah[i * P + a] * aw[j * P + b];
  if (s.version >= 2) {  // sincos_2d: first half from the column index, second from the row
    in.key_pos.resize(in.n * D);
    for (int i = 0; i < h; ++i)
      for (int j = 0; j < w; ++j) {
        float* row = &in.key_pos[(static_cast<size_t>(i) * w + j) * D];
        SinCos(D / 2, static_cast<float>(j), row);
        SinCos(D / 2, static_cast<float>(i), row + D / 2);
      }
  } else {
    if (static_cast<int64_t>(key_pos_fixed.size()) != in.n * D)
      throw Err("vision/key_pos.bin does not fit a " + std::to_string(h) + "x" + std::to_string(w) + " patch grid");
    in.key_pos = key_pos_fixed;
  }
  return in;
}

// ---------------------------------------------------------------- prompt (slicing.build_prompt)
std::vector<int32_t> BuildPrompt(const Plan& p, const ImageTokens& t, const std::vector<int32_t>& prefix,
                                 const std::vector<int32_t>& text, std::vector<int64_t>* starts) {
  std::vector<int32_t> one{t.im_start}, ids;
  one.insert(one.end(), p.query_num, t.unk);
  one.push_back(t.im_end);
  if (t.bos >= 0) ids.push_back(t.bos);
  ids.insert(ids.end(), prefix.begin(), prefix.end());
  ids.insert(ids.end(), one.begin(), one.end());
  if (p.sliced()) {
    ids.push_back(t.slice_start);
    for (int r = 0; r < p.rows; ++r) {
      if (r) ids.insert(ids.end(), t.newline.begin(), t.newline.end());
      for (int c = 0; c < p.cols; ++c) ids.insert(ids.end(), one.begin(), one.end());
    }
    ids.push_back(t.slice_end);
  }
  ids.insert(ids.end(), t.newline.begin(), t.newline.end());
  ids.insert(ids.end(), text.begin(), text.end());
  starts->clear();
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] == t.im_start) starts->push_back(static_cast<int64_t>(i) + 1);
  if (starts->size() != p.Images().size())
    throw Err("prompt text contains the <image> token id " + std::to_string(t.im_start) + " itself; remove it");
  return ids;
}

}  // namespace mcpm
