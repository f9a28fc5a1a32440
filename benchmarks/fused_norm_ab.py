"""Decode with the runtime's one-pass RMSNorm against transformers' LlamaRMSNorm, alternated in one run.

    python benchmarks/fused_norm_ab.py OUT_DIR [--layers 2] [--rounds 8] [--steps 10] [--threads 2]

``sparsify_model`` swaps a Llama's RMSNorm modules for :class:`sparsify.inference.runtime.RMSNorm`
(:func:`~sparsify.inference.runtime.use_fused_norms`: one kernel call where transformers runs eight tensor
ops). This measures what that does to a decode step: the Llama-2-7B-shaped model of the decode benchmark
(``sparsify.bench.cpu.build_decode_model``: 70% per-row pruning, random weights) on the sparse kernels
as 70% INT8 + INT8 lm_head and as 70% bf16, each run once with the runtime's norms and once with
transformers' own put back (the same model object: only the norm modules change). Both paths users take
are timed: the serving engine's step (``BatchedLlama.forward``, one sequence) and the model's own forward
(decoder + lm_head, as ``generate`` runs it, with transformers' KV cache). Rounds of ``steps`` greedy
decode steps alternate the two norms, order reversed every round; reported: median ms/token with its
standard error, the ratio (transformers' / ours: > 1, the runtime's norms are faster) and whether both
produce the same tokens. Writes ``OUT_DIR/fused_norm_ab.json`` with the machine record (ISA, caps).
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsify.bench.cpu import (  # noqa: E402
    _decode_steps,
    build_decode_model,
    decode_ab_main,
    machine_info,
    median_se,
)
from sparsify.inference.engine import BatchedLlama  # noqa: E402
from sparsify.inference.kernels import ops  # noqa: E402
from sparsify.inference.runtime import RMSNorm, sparsify_model  # noqa: E402

logger = logging.getLogger("fused_norm_ab")
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
VARIANTS = {"int8_head": {"int8": True, "lm_head": True}, "bf16": {}}


def with_both_norms(base: nn.Module, **sparsify: bool) -> tuple[nn.Module, dict[str, dict[str, nn.Module]]]:
    """A bf16 copy of ``base`` on the kernels, and for each norm's name its two modules:
    ``{"ours": runtime.RMSNorm, "transformers": the module it replaced}``."""
    model = copy.deepcopy(base).to(torch.bfloat16)
    originals = {name: m for name, m in model.named_modules() if name.endswith("norm")}
    sparsify_model(model, **sparsify)
    norms = {}
    for name, original in originals.items():
        ours = model.get_submodule(name)
        if not isinstance(ours, RMSNorm):
            raise RuntimeError(f"{name} was not swapped for the runtime's RMSNorm (are the kernels compiled?)")
        norms[name] = {"ours": ours, "transformers": original}
    return model, norms


def set_norms(model: nn.Module, norms: dict[str, dict[str, nn.Module]], which: str) -> None:
    for name, pair in norms.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, pair[which])


@torch.no_grad()
def engine_steps(model: nn.Module, prompt: list[int], steps: int) -> tuple[list[float], list[int]]:
    """Greedy decode through the serving engine's batched forward, one sequence: seconds per step, tokens."""
    runner = BatchedLlama(model)
    cache = runner.new_cache(len(prompt) + steps + 1)
    token = int(runner.forward([prompt], [cache]).argmax())
    seconds, tokens = [], [token]
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.forward([[token]], [cache])
        seconds.append(time.perf_counter() - t0)
        token = int(logits.argmax())
        tokens.append(token)
    return seconds, tokens


def run(layers: int = 2, rounds: int = 8, steps: int = 10, **dims: int) -> dict:
    if ops.kernel_isa() == "torch":
        raise SystemExit("no compiled kernels here: the runtime's RMSNorm is one of them")
    base = build_decode_model(layers=layers, **dims)
    ids = [t % base.config.vocab_size for t in PROMPT]
    prompt = torch.tensor([ids])
    rows = {}
    for variant, sparsify in VARIANTS.items():
        model, norms = with_both_norms(base, **sparsify)
        samples = {(path, which): [] for path in ("engine", "forward") for which in ("transformers", "ours")}
        tokens: dict[tuple[str, str], list[int]] = {}
        for which in ("transformers", "ours"):  # warm-up
            set_norms(model, norms, which)
            engine_steps(model, ids, 2)
            _decode_steps(model, prompt, 2)
        for r in range(rounds):
            for which in ("transformers", "ours") if r % 2 == 0 else ("ours", "transformers"):
                set_norms(model, norms, which)
                seconds, tokens["engine", which] = engine_steps(model, ids, steps)
                samples["engine", which] += [s * 1e3 for s in seconds]
                body, head, tokens["forward", which] = _decode_steps(model, prompt, steps)
                samples["forward", which] += [(b + h) * 1e3 for b, h in zip(body, head, strict=True)]
        set_norms(model, norms, "ours")
        for path in ("engine", "forward"):
            theirs, ours = samples[path, "transformers"], samples[path, "ours"]
            row = {
                "transformers_ms": statistics.median(theirs),
                "transformers_ms_se": median_se(theirs),
                "ours_ms": statistics.median(ours),
                "ours_ms_se": median_se(ours),
                "speedup": statistics.median(theirs) / statistics.median(ours),
                "same_tokens": tokens[path, "transformers"] == tokens[path, "ours"],
            }
            rows[f"{variant}/{path}"] = row
            logger.info(
                "%s, %s: transformers' norms %.2f ± %.2f, ours %.2f ± %.2f ms/token, x%.3f, same tokens: %s",
                variant, path, row["transformers_ms"], row["transformers_ms_se"], row["ours_ms"],
                row["ours_ms_se"], row["speedup"], row["same_tokens"],
            )  # fmt: skip
        del model, norms
    return {"machine": machine_info(), "layers": layers, "rounds": rounds, "steps": steps, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    return decode_ab_main(argv, __doc__, run, "fused_norm_ab.json", rounds=8)


if __name__ == "__main__":
    main()
