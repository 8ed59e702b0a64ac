"""LLaVA-UHD slice planning (MiniCPM-V 2.0) and the image-token prompt layout.

The planner reproduces OpenBMB's ``slice_image`` decisions exactly, including Python's
round-half-to-even in ``ensure_divide`` and int() truncation in ``find_best_resize``; any
runtime (host or phone) must make the same choices or the image tokens will not line up.

    ratio = W*H / scale^2, multiple = min(ceil(ratio), max_slices)
    multiple <= 1: one image, resized to about scale^2 area (sides multiples of the patch)
    otherwise:     candidate counts multiple-1, multiple, multiple+1 (not 1, not > max_slices),
                   every factorisation (cols, rows) a grid, keep the first one minimising
                   |log(W/H) - log(cols/rows)|; a thumbnail of about scale^2 plus the image
                   resized so each cell is about scale^2, cut row by row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ExportError
from ..tokenizer import Tokenizer

IMAGE_START, IMAGE_END, SLICE_START, SLICE_END = "<image>", "</image>", "<slice>", "</slice>"


def ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], scale: int, patch: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    width, height = size
    if width * height > scale * scale or allow_upscale:
        r = width / height
        height = int(scale / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    cols, rows = grid
    refine_w, refine_h = ensure_divide(size[0], cols), ensure_divide(size[1], rows)
    cell = find_best_resize((refine_w / cols, refine_h / rows), scale, patch, allow_upscale=True)
    return cell[0] * cols, cell[1] * rows


def best_grid(width: int, height: int, multiple: int, max_slices: int) -> tuple[int, int]:
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for cols in range(1, n + 1):
            if n % cols:
                continue
            err = abs(log_ratio - math.log(cols / (n // cols)))
            if err < best_err:
                best, best_err = (cols, n // cols), err
    return best


@dataclass(frozen=True)
class ImagePlan:
    size: tuple[int, int]                   # original (width, height)
    thumb: tuple[int, int]                  # (width, height) of the overview image
    grid: tuple[int, int] | None = None     # (cols, rows) of slices, None when not sliced
    refine: tuple[int, int] | None = None   # (width, height) the image is resized to before cutting
    query_num: int = 64
    patch: int = 14

    @property
    def cell(self) -> tuple[int, int] | None:
        if self.grid is None:
            return None
        return self.refine[0] // self.grid[0], self.refine[1] // self.grid[1]

    @property
    def num_slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def images(self) -> list[tuple[int, int]]:
        """(width, height) of every image the encoder sees: the thumbnail, then cells row by row."""
        return [self.thumb] + [self.cell] * self.num_slices

    @property
    def patch_grids(self) -> list[tuple[int, int]]:
        """(rows h, cols w) of ViT patches for every encoded image."""
        return [(h // self.patch, w // self.patch) for w, h in self.images]

    @property
    def feature_tokens(self) -> int:
        return self.query_num * len(self.images)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "thumbnail": list(self.thumb),
                "grid": list(self.grid) if self.grid else None,
                "refine": list(self.refine) if self.refine else None,
                "slice": list(self.cell) if self.cell else None,
                "num_images": len(self.images), "patch_grids": [list(g) for g in self.patch_grids],
                "image_feature_tokens": self.feature_tokens}


def plan_image(width: int, height: int, vcfg) -> ImagePlan:
    """The slice plan for an image of ``width`` x ``height`` under a VisionConfig-like object."""
    if width <= 0 or height <= 0:
        raise ExportError(f"image size {width}x{height} is not a valid image size")
    q, p = vcfg.query_num, vcfg.patch
    if not vcfg.slicing:   # MiniCPM-V 1.0: one fixed square input
        return ImagePlan((width, height), (vcfg.image_size, vcfg.image_size), query_num=q, patch=p)
    scale, max_slices = vcfg.scale_resolution, vcfg.max_slice_nums
    ratio = width * height / (scale * scale)
    multiple = min(math.ceil(ratio), max_slices)
    if multiple <= 1:
        thumb = find_best_resize((width, height), scale, p, allow_upscale=True)
        return ImagePlan((width, height), thumb, query_num=q, patch=p)
    thumb = find_best_resize((width, height), scale, p)
    grid = best_grid(width, height, multiple, max_slices)
    refine = get_refine_size((width, height), grid, scale, p)
    return ImagePlan((width, height), thumb, grid, refine, query_num=q, patch=p)


def slice_images(image, plan: ImagePlan) -> list:
    """PIL images the encoder sees (thumbnail first, then cells row by row), bicubic like OpenBMB."""
    from PIL import Image
    image = image.convert("RGB")
    out = [image.resize(plan.thumb, Image.Resampling.BICUBIC)]
    if plan.grid is not None:
        refined = image.resize(plan.refine, Image.Resampling.BICUBIC)
        cw, ch = plan.cell
        for top in range(0, plan.refine[1], ch):
            for left in range(0, plan.refine[0], cw):
                out.append(refined.crop((left, top, left + cw, top + ch)))
    return out


@dataclass(frozen=True)
class ImageTokens:
    im_start: int
    im_end: int
    slice_start: int
    slice_end: int
    unk: int
    newline: list[int]

    @classmethod
    def from_tokenizer(cls, tok, config_json=None) -> "ImageTokens":
        """Ids of the image pieces: SentencePiece pieces, else tokenizer_config.json added tokens."""
        import json
        from pathlib import Path
        sp = tok.sp
        added = {}
        if config_json is not None and Path(config_json).is_file():
            decoder = json.loads(Path(config_json).read_text()).get("added_tokens_decoder", {})
            added = {v.get("content"): int(k) for k, v in decoder.items()}
        ids = {}
        for piece in (IMAGE_START, IMAGE_END, SLICE_START, SLICE_END):
            i = sp.PieceToId(piece)
            if i == sp.unk_id() or sp.IdToPiece(i) != piece:
                if piece not in added:
                    raise ExportError(f"tokenizer has no '{piece}' token: not a MiniCPM-V tokenizer")
                i = added[piece]
            ids[piece] = i
        nl = sp.PieceToId("<0x0A>")
        newline = [nl] if nl != sp.unk_id() else [i for i in sp.EncodeAsIds("\n") if sp.IdToPiece(i) != "▁"]
        return cls(ids[IMAGE_START], ids[IMAGE_END], ids[SLICE_START], ids[SLICE_END], sp.unk_id(), newline)


def image_prompt_ids(plan: ImagePlan, t: ImageTokens) -> list[int]:
    """<image><unk>*q</image> then, when sliced, <slice> rows of cells joined by newlines </slice>."""
    one = [t.im_start] + [t.unk] * plan.query_num + [t.im_end]
    ids = list(one)
    if plan.grid is not None:
        cols, rows = plan.grid
        ids.append(t.slice_start)
        for r in range(rows):
            if r:
                ids += t.newline
            ids += one * cols
        ids.append(t.slice_end)
    return ids


def build_prompt(plan: ImagePlan, t: ImageTokens, text_ids: list[int], bos: int | None,
                 prefix_ids: list[int] = ()) -> tuple[list[int], list[int]]:
    """(token ids, start index of each image's feature span); layout: [bos] prefix image-block \\n text
    (prefix: a chat template's text before the image, e.g. MiniCPM-V's user role)."""
    ids = ([bos] if bos is not None else []) + list(prefix_ids) + image_prompt_ids(plan, t) + t.newline + list(text_ids)
    starts = [i + 1 for i, x in enumerate(ids) if x == t.im_start]
    if len(starts) != len(plan.images):
        raise ExportError(f"prompt text contains '{IMAGE_START}' itself; remove it")
    return ids, starts


def image_prompt(tokenizer: Tokenizer, plan: ImagePlan, text: str, config_json=None,
                 template=None) -> tuple[list[int], list[int]]:
    """Token ids of [bos] image-block newline text, and where each image's 64 features go. With a chat
    ``template`` (exporter/chat.py, minicpm-v): the text is a user turn opened by the image,
    [bos] <用户> image-block newline text <AI>, as MiniCPM-V's chat() builds it."""
    before, text = template.image_turn(text) if template is not None else ("", text)
    return build_prompt(plan, ImageTokens.from_tokenizer(tokenizer, config_json), tokenizer.encode(text, bos=False),
                        tokenizer.bos_id, tokenizer.encode(before, bos=False))


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's view of a recipe's ``vision`` table (no checkpoint needed)."""
    query_num: int = 64
    patch: int = 14
    slicing: bool = True
    max_slice_nums: int = 9
    scale_resolution: int = 448
    image_size: int = 448

    @classmethod
    def from_recipe(cls, recipe) -> "PlannerSettings":
        if not recipe.is_vision:
            raise ExportError(f"recipe '{recipe.name}' is not a vision recipe (family {recipe.family})")
        v = recipe.vision
        return cls(int(v.get("query_num", 64)), int(v.get("patch_size", 14)), bool(v.get("slicing", True)),
                   int(v.get("max_slice_nums", 9)), int(v.get("scale_resolution", 448)),
                   int(v.get("image_size", 448)))


def read_image(path, label: str = ""):
    """An image file, pixels loaded (a truncated file is refused here, not later), as a PIL image;
    ExportError for anything Pillow cannot read, incl. decompression bombs (huge claimed sizes)."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError as e:
        raise ExportError(f"{label}{path}: refusing the image ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ExportError(f"{label}{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def plan_file(path, recipe) -> dict:
    """`mcpm-export image-plan`: the plan of an image file under a recipe, as a dict."""
    settings = PlannerSettings.from_recipe(recipe)
    with read_image(path) as im:
        width, height = im.size
    plan = plan_image(width, height, settings)
    one_token = ImageTokens(1, 2, 3, 4, 0, [5])     # MiniCPM's "\n" is one token (<0x0A>)
    return {"image": str(path), "recipe": recipe.name, **plan.to_dict(),
            "prompt_image_tokens": len(image_prompt_ids(plan, one_token))}
