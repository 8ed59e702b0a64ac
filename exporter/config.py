"""MiniCPM text-model configuration, read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ExportError

TEXT_ARCHITECTURES = ("MiniCPMForCausalLM",)


@dataclass(frozen=True)
class MiniCPMConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    scale_emb: float
    dim_model_base: float
    scale_depth: float
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def residual_scale(self) -> float:
        """Each residual branch is multiplied by this (MiniCPM's depth scaling)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """The final hidden state is divided by this before the LM head (muP width scaling)."""
        return self.hidden_size / self.dim_model_base

    @classmethod
    def from_hf(cls, raw: dict, where: str = "config.json") -> "MiniCPMConfig":
        def need(key):
            if key not in raw:
                raise ExportError(f"{where}: missing field '{key}'")
            return raw[key]

        eos = raw.get("eos_token_id", 2)
        return cls(
            hidden_size=int(need("hidden_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(raw.get("num_key_value_heads") or need("num_attention_heads")),
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            scale_emb=float(raw.get("scale_emb", 1.0)),
            dim_model_base=float(raw.get("dim_model_base", need("hidden_size"))),
            scale_depth=float(raw.get("scale_depth", math.sqrt(need("num_hidden_layers")))),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=int(raw.get("bos_token_id", 1)),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def read_config_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: config.json not found") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
