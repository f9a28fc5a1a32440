"""Building Llama-family models, and choosing the device and dtype they run in.

Checkpoints are written and read by `sparsify.checkpoint`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from pydantic import Field, model_validator

from sparsify.config import Section
from sparsify.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)


class ArchConfig(Section):
    """Shape of the embedded default Llama (ignored when `base.source` is set)."""

    hidden_size: int = Field(default=256, gt=0)
    intermediate_size: int = Field(default=768, gt=0)
    num_hidden_layers: int = Field(default=4, gt=0)
    num_attention_heads: int = Field(default=4, gt=0)
    num_key_value_heads: int = Field(default=4, gt=0)
    max_position_embeddings: int = Field(default=512, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("project.device is 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) under which its bf16 matmuls are still
# native: AVX512_CORE_BF16 and the AMX levels above it. Any lower cap emulates bf16.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "ALL")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX,
    unless torch is capped below AVX-512 by ATEN_CPU_CAPABILITY, or oneDNN below its bf16 level).

    Elsewhere bf16 is emulated and slower than fp32, so "auto" dtypes fall back to fp32. The caps
    count because they are how an AVX-512 machine is made to run as an AVX2-only one.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    onednn_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if onednn_cap not in _ONEDNN_BF16_ISAS:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype for a config's ``dtype`` key: float32, bfloat16, or auto (bf16 where native, else fp32)."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_llama(arch: ArchConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape, its vocabulary taken from `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # here: loading the configuration needs no transformers

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
