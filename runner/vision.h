// mcpm-run's image path (no TVM in here): binary PPM input, the LLaVA-UHD slice plan, PIL-compatible
// bicubic resize, the encoder inputs and the image prompt. Each function is a port of the Python
// reference named next to it; errors are std::runtime_error with one line of text.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mcpm {

struct Image {  // 8-bit RGB, interleaved, row-major
  int w = 0, h = 0;
  std::vector<uint8_t> rgb;
};

// Binary PPM (P6, maxval 255) only; anything else is rejected.
Image ReadPpm(const std::string& path);
void WritePpm(const std::string& path, const Image& im);

// The VisionConfig fields the runner needs (vision/vision-config.json "config").
struct VisionSettings {
  int version = 2, patch = 14, pos_grid = 27, hidden = 0, query_num = 64, image_size = 448;
  int scale_resolution = 448, max_slice_nums = 9;
  bool slicing = true;
  float mean = 0.5f, std = 0.5f;
  // slicing.resize_pass_order: PIL resizes in two 8-bit passes; Pillow < 13 always horizontal first,
  // Pillow >= 13 vertical first when the height loses more than twice as many pixels as the width.
  bool pillow13_order = false;
};

// exporter/vision/slicing.py ImagePlan.
struct Plan {
  int w = 0, h = 0, thumb_w = 0, thumb_h = 0;
  int cols = 0, rows = 0, refine_w = 0, refine_h = 0;  // cols == 0: not sliced
  int query_num = 64, patch = 14;
  bool sliced() const { return cols > 0; }
  std::vector<std::pair<int, int>> Images() const;  // (w, h): thumbnail, then cells row by row
  std::string Json() const;                         // ImagePlan.to_dict()
};

Plan PlanImage(int w, int h, const VisionSettings& s);     // slicing.plan_image
Image Resize(const Image& im, int w, int h, bool pillow13_order);  // PIL Image.resize(..., BICUBIC)
std::vector<Image> SliceImages(const Image& im, const Plan& p, bool pillow13_order);  // slicing.slice_images

// preprocess.encoder_inputs: float32 patches [n, 3*p*p], pos_interp [n, P*P], key_pos [n, hidden]
struct EncoderInputs {
  int64_t n = 0;
  std::vector<float> patches, pos_interp, key_pos;
};
EncoderInputs MakeInputs(const Image& im, const VisionSettings& s, const std::vector<float>& key_pos_fixed);

struct ImageTokens {
  int32_t im_start = -1, im_end = -1, slice_start = -1, slice_end = -1, unk = -1, bos = -1;  // bos -1: none
  std::vector<int32_t> newline;
};

// slicing.build_prompt: [bos] prefix image-block newline text; *starts = first feature row of each image.
std::vector<int32_t> BuildPrompt(const Plan& p, const ImageTokens& t, const std::vector<int32_t>& prefix,
                                 const std::vector<int32_t>& text, std::vector<int64_t>* starts);

}  // namespace mcpm
