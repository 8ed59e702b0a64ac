"""LLaVA-UHD slice planner vs OpenBMB's published algorithm, prompt layout, image-plan CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from exporter.errors import ExportError
from exporter.recipes import get_recipe
from exporter.vision.slicing import ImageTokens, build_prompt, image_prompt_ids, plan_image, slice_images


class V2:   # the planner settings of recipes/v2-int4.toml
    query_num, patch, slicing, max_slice_nums, scale_resolution, image_size = 64, 14, True, 9, 448, 448


class V1:
    query_num, patch, slicing, max_slice_nums, scale_resolution, image_size = 64, 14, False, 9, 448, 448


# ---- a literal transcription of OpenBMB MiniCPM-V-2 modeling_minicpmv.py slice_image & helpers --------
def _ref_ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def _ref_find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    if (width * height > scale_resolution * scale_resolution) or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return (_ref_ensure_divide(width, patch_size), _ref_ensure_divide(height, patch_size))


def _ref_get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=False):
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = _ref_ensure_divide(width, grid_x)
    refine_height = _ref_ensure_divide(height, grid_y)
    best = _ref_find_best_resize((refine_width / grid_x, refine_height / grid_y), scale_resolution,
                                 patch_size, allow_upscale=allow_upscale)
    return (best[0] * grid_x, best[1] * grid_y)


def _ref_slice_plan(size, max_slice_nums=9, scale_resolution=448, patch_size=14):
    """(source size, best_grid, refine size) exactly as slice_image decides them."""
    original_width, original_height = size
    log_ratio = math.log(original_width / original_height)
    ratio = original_width * original_height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return _ref_find_best_resize(size, scale_resolution, patch_size, allow_upscale=True), None, None
    candidate_split_grids_nums = []
    for i in [multiple - 1, multiple, multiple + 1]:
        if i == 1 or i > max_slice_nums:
            continue
        candidate_split_grids_nums.append(i)
    best_resize = _ref_find_best_resize(size, scale_resolution, patch_size)
    candidate_grids = []
    for split_grids_nums in candidate_split_grids_nums:
        m = 1
        while m <= split_grids_nums:
            if split_grids_nums % m == 0:
                candidate_grids.append([m, split_grids_nums // m])
            m += 1
    best_grid = [1, 1]
    min_error = float("inf")
    for grid in candidate_grids:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < min_error:
            best_grid = grid
            min_error = error
    refine_size = _ref_get_refine_size(size, best_grid, scale_resolution, patch_size, allow_upscale=True)
    return best_resize, tuple(best_grid), refine_size


SIZES = [(448, 448), (449, 449), (1, 1), (14, 14), (640, 480), (1344, 896), (896, 1344), (1920, 1080),
         (1080, 1920), (4032, 3024), (3000, 3000), (4000, 200), (200, 4000), (10000, 30), (30, 10000),
         (1000, 100), (895, 449), (896, 448), (1792, 448), (2000, 1500), (5000, 5000), (333, 777), (801, 250)]


@pytest.mark.parametrize("size", SIZES + [(int(w), int(h)) for w, h in
                                          np.random.default_rng(0).integers(1, 5000, size=(200, 2))])
def test_planner_matches_reference_algorithm(size):
    plan = plan_image(*size, V2)
    thumb, grid, refine = _ref_slice_plan(size)
    assert plan.thumb == thumb and plan.grid == grid and plan.refine == refine
    for w, h in plan.images:
        assert w % 14 == 0 and h % 14 == 0 and w >= 14 and h >= 14


# hand-computed: (size) -> thumbnail, (cols, rows), refine, slice
HAND = {
    (448, 448): ((448, 448), None, None, None),
    (1344, 896): ((546, 364), (3, 2), (1344, 896), (448, 448)),
    (4000, 200): ((2002, 98), (5, 1), (4480, 224), (896, 224)),
    (200, 4000): ((98, 2002), (1, 5), (224, 4480), (224, 896)),
}


@pytest.mark.parametrize("size", list(HAND))
def test_planner_hand_checked(size):
    plan = plan_image(*size, V2)
    assert (plan.thumb, plan.grid, plan.refine, plan.cell) == HAND[size]


def test_v1_is_one_fixed_square():
    plan = plan_image(4000, 200, V1)
    assert plan.images == [(448, 448)] and plan.patch_grids == [(32, 32)] and plan.feature_tokens == 64


def test_bad_size_is_one_clear_error():
    with pytest.raises(ExportError, match="0x10"):
        plan_image(0, 10, V2)


def test_slices_are_cut_row_by_row_like_openbmb():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (896, 1344, 3), dtype=np.uint8))
    plan = plan_image(1344, 896, V2)
    out = slice_images(img, plan)
    assert [im.size for im in out] == plan.images and len(out) == 7
    refined = img.resize(plan.refine, Image.Resampling.BICUBIC)
    # OpenBMB split_to_patches: for i in range(0, height, cell_h): for j in range(0, width, cell_w)
    expected = [refined.crop((j, i, j + 448, i + 448)) for i in range(0, 896, 448) for j in range(0, 1344, 448)]
    for got, want in zip(out[1:], expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert np.array_equal(np.asarray(out[0]), np.asarray(img.resize((546, 364), Image.Resampling.BICUBIC)))


TOK = ImageTokens(im_start=101, im_end=102, slice_start=103, slice_end=104, unk=0, newline=[13])


def test_prompt_layout_sliced():
    plan = plan_image(1344, 896, V2)     # 3 cols x 2 rows
    img = [101] + [0] * 64 + [102]
    want = img + [103] + img * 3 + [13] + img * 3 + [104]
    assert image_prompt_ids(plan, TOK) == want
    ids, starts = build_prompt(plan, TOK, [7, 8, 9], bos=1)
    assert ids == [1] + want + [13, 7, 8, 9]
    assert len(starts) == 7 and all(ids[s - 1] == 101 and ids[s + 64] == 102 for s in starts)
    assert all(set(ids[s:s + 64]) == {0} for s in starts)


def test_prompt_layout_thumbnail_only():
    ids, starts = build_prompt(plan_image(300, 200, V2), TOK, [5], bos=1)
    assert ids == [1, 101] + [0] * 64 + [102, 13, 5] and starts == [2]


def test_prompt_refuses_literal_image_marker_in_text():
    with pytest.raises(ExportError, match="<image>"):
        build_prompt(plan_image(300, 200, V2), TOK, [101], bos=1)


def test_image_plan_cli(tmp_path):
    from exporter.cli import main
    path = tmp_path / "wide.png"
    Image.new("RGB", (4000, 200), (10, 20, 30)).save(path)
    res = CliRunner().invoke(main, ["image-plan", str(path), "--model", "v2-int4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["grid"] == [5, 1] and out["slice"] == [896, 224] and out["thumbnail"] == [2002, 98]
    assert out["image_feature_tokens"] == 6 * 64 and out["prompt_image_tokens"] == 6 * 66 + 2
    res = CliRunner().invoke(main, ["image-plan", str(path), "--model", "tiny"])
    assert res.exit_code == 1 and "not a vision recipe" in res.output


def test_image_plan_cli_bad_file(tmp_path):
    from exporter.cli import main
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    res = CliRunner().invoke(main, ["image-plan", str(bad), "--model", "v2-int4"])
    assert res.exit_code == 1 and str(bad) in res.output and res.output.count("\n") <= 2


def test_ios_refuses_vision_recipes():
    for name in ("v-int4", "v2-int4"):
        with pytest.raises(ExportError, match="ios"):
            get_recipe(name).require_target("ios")


def test_image_token_ids_from_pieces_or_added_tokens(tmp_path):
    from exporter.tokenizer import Tokenizer
    from tests.support.tiny_minicpmv import TEXT_MODEL
    tok = Tokenizer(TEXT_MODEL / "tokenizer.model")          # a text tokenizer: no image pieces
    with pytest.raises(ExportError, match="no '<image>' token"):
        ImageTokens.from_tokenizer(tok)
    cfg = tmp_path / "tokenizer_config.json"                  # MiniCPM-V-2 style added_tokens_decoder
    cfg.write_text(json.dumps({"added_tokens_decoder": {
        "101": {"content": "<image>"}, "102": {"content": "</image>"},
        "111": {"content": "<slice>"}, "112": {"content": "</slice>"}}}))
    t = ImageTokens.from_tokenizer(tok, cfg)
    assert (t.im_start, t.im_end, t.slice_start, t.slice_end, t.unk) == (101, 102, 111, 112, 0)
    assert t.newline == [tok.sp.PieceToId("<0x0A>")]
