"""The pipeline's typed configuration: `params.yaml` validated into frozen pydantic models.

One section per stage. The algorithms' own options are sparsify's models, composed here as they
are (`data`: `sparsify.data.corpus.DataConfig`, `base.arch`: `sparsify.model.ArchConfig`, every
`train`: `sparsify.training.trainer.TrainConfig`, `prune`: `sparsify.sparsity.pruning.PruneConfig`,
`downstream`: `sparsify.data.downstream.DownstreamConfig`); the sections only the pipeline reads,
the root `Config` and the loader live here. Unknown keys, wrong types and out-of-range values are
errors that name the key (`data.sources.0.weight: ...`) and say what is allowed.
`load_config` applies, in order: the file, a named profile from its `profiles:`
mapping, nested overrides (Prefect flow parameters), then `KEY=VALUE` overrides
(the CLI's `--set`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sparsify.config import Section
from sparsify.data.corpus import DataConfig
from sparsify.data.downstream import DownstreamConfig
from sparsify.errors import ConfigError
from sparsify.model import ArchConfig
from sparsify.quant.quantization import QuantConfig
from sparsify.sparsity.pruning import PruneConfig
from sparsify.training.trainer import TrainConfig


class ProjectConfig(Section):
    seed: int = 0
    root: str = "."  # every output lives under this folder (data/, models/, metrics/, reports/)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # None: sqlite file `mlflow.db` in the project root
    experiment: str = "sparsellama"
    # MLflow system metrics (CPU, memory, disk, network, GPU) every N seconds while a stage runs; null: off.
    system_metrics_interval_s: float | None = Field(default=10.0, gt=0)


class BaseStageConfig(Section):
    source: str | None = None  # an HF Llama-family checkpoint (path or hub name); None: train the default
    arch: ArchConfig = ArchConfig()
    train: TrainConfig


class PretrainConfig(Section):
    """Sparse continued pretraining (masks fixed); KD from the dense base when kd_kl/kd_squarehead > 0."""

    train: TrainConfig


class FinetuneConfig(Section):
    """Per-task fine-tuning: `dense` trains the teacher, `sparse` the sparse models (with KD)."""

    dense: TrainConfig
    sparse: TrainConfig
    max_length: int = Field(default=512, ge=16)  # prompt + target tokens; prompts are cut from the left
    baseline: bool = True  # also run pruning-during-fine-tuning at the highest sparsity

    @model_validator(mode="after")
    def _teacher_only_for_sparse(self) -> FinetuneConfig:
        if self.dense.kd_kl > 0 or self.dense.kd_squarehead > 0:
            raise ValueError(
                "finetune.dense trains the teacher and has no teacher itself: set kd_kl and kd_squarehead to 0"
            )
        return self


# Named schemes: the fields of QuantConfig each one sets (the rest come from `quantize`).
QUANT_SCHEMES: dict[str, dict] = {
    "w8a8": {"weight_bits": 8, "group_size": None, "activation_bits": 8, "smoothquant": True},
    "w4a16": {"weight_bits": 4, "group_size": 128, "activation_bits": None, "smoothquant": False},
}


class QuantizeConfig(Section):
    """Quantization on top of sparsity: each scheme applied to the sparse models."""

    schemes: list[Literal["w8a8", "w4a16"]] = Field(default=["w8a8", "w4a16"])
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int = Field(default=128, gt=0)  # INT4 group (w4a16)
    smoothquant_alpha: float = Field(default=0.5, ge=0, le=1)
    act_order: bool = False
    block_size: int = Field(default=128, gt=0)
    dampening: float = Field(default=0.01, gt=0)
    num_samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=256, gt=0)
    finetuned: bool = True  # also quantize the top-level sparse fine-tuned models (task metrics)

    def scheme(self, name: str) -> QuantConfig:
        """The full QuantConfig of a named scheme (validated: bad bit widths/groups are errors)."""
        preset = dict(QUANT_SCHEMES[name])
        if preset["group_size"] is not None:
            preset["group_size"] = self.group_size
        shared = self.model_dump(exclude={"schemes", "group_size", "finetuned"})
        return QuantConfig.model_validate({**shared, **preset})


class SandboxConfig(Section):
    """Limits for model-generated code (pass@1) and whether it may run without kernel isolation.

    The pipeline's validated form of `sparsify.evaluation.sandbox.SandboxPolicy` (that module also runs
    as a standard-library-only runner script, so it holds no pydantic model); `tasks.evaluate` turns it
    into the policy. The code runs under bubblewrap (`sparsify.evaluation.sandbox`). Where bwrap is
    missing or cannot create namespaces, generated code is refused unless `allow_unisolated` is true:
    then it runs with only rlimits and a Python-level guard, and the eval results say so.
    """

    allow_unisolated: bool = False
    timeout_s: float = Field(default=5.0, gt=0)  # wall clock per program
    memory_mb: int = Field(default=512, gt=0)  # address space per process
    max_procs: int = Field(default=16, gt=0)  # processes and threads at once
    max_file_mb: int = Field(default=1, gt=0)  # largest file written (captured output included)
    tmp_mb: int = Field(default=16, gt=0)  # the program's private temp folder


class EvaluateConfig(Section):
    val_blocks: int = Field(default=64, gt=0)  # validation blocks behind every stage's ppl/val
    limit: int | None = Field(default=None, gt=0)  # documents per task (None: the whole test split)
    batch_size: int = Field(default=8, gt=0)
    extra_tasks: list[str] = []  # standard lm-eval tasks (arc_easy, hellaswag, ...) on machines that have them
    # Score the model as it is deployed: loaded onto the sparse CPU runtime (sparsify.inference.loading), the
    # same kernels `sparsellama generate` / `serve-model` run; on the CPU.
    runtime: bool = False
    sandbox: SandboxConfig = SandboxConfig()  # model-generated code (pass@1)


class BenchmarkConfig(Section):
    quick: bool = False  # only the 11008x4096 batch-1 layer benchmark (a few seconds)
    decode: bool = True  # end-to-end decode tokens/s (7B-shaped model and the pipeline's sparsest model)
    decode_layers: int = Field(default=2, gt=0)  # decoder layers of the 7B-shaped model
    threads: int | None = Field(default=None, ge=1)


class PipelineConfig(Section):
    """The paper's schedule: prune to each sparsity in turn, each level starting from the previous one."""

    sparsities: list[float] = Field(default=[0.5, 0.7], min_length=1)
    # Also continue training the dense base on the same extra tokens the most sparse model saw
    # (pretrain.train.steps per level, plain cross-entropy): the fair perplexity reference while
    # the base model has not converged.
    dense_control: bool = True

    @field_validator("sparsities")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"each sparsity must be in (0, 1), got {v}")
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"sparsities must increase (each level prunes the previous one further), got {v}")
        if len({round(s * 100) for s in v}) != len(v):
            raise ValueError(f"sparsities must differ in whole percent (they name the stages), got {v}")
        return v


class OrchestrationConfig(Section):
    # Stages running at once in the Prefect flow. On a 2-core CPU two torch jobs slow each
    # other ~10x, so 1; raise it where independent stages have their own devices.
    max_parallel: int = Field(default=1, ge=1)
    # The `run-stage` deployment on a GPU work pool (prefect.yaml: "run-stage/gpu"): stages that need
    # an accelerator (training, pruning, quantization, evaluation) run there, one flow run each, the
    # rest in the flow's own process. The workers must see the same project.root. None: all local.
    gpu_deployment: str | None = Field(default=None, pattern=r"^[^/]+/[^/]+$")


class Config(Section):
    project: ProjectConfig = ProjectConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig
    base: BaseStageConfig
    prune: PruneConfig = PruneConfig()
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    quantize: QuantizeConfig = QuantizeConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pipeline: PipelineConfig = PipelineConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @property
    def root(self) -> Path:
        return Path(self.project.root)

    @property
    def tokenizer_source(self) -> str | None:
        """The tokenizer every token of the pipeline is written with: `data.tokenizer`, else the base
        checkpoint's own (a model only understands its own token ids); None: train a BPE."""
        return self.data.tokenizer or self.base.source


# --------------------------------------------------------------------------- loading


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _field_names(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Allowed keys of the section at `loc`, walking the model's annotations."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return None
    return sorted(getattr(current, "model_fields", {}))


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        if e["type"] == "extra_forbidden":
            allowed = _field_names(Config, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{got_s}")
    return f"invalid configuration ({origin}):\n  " + "\n  ".join(lines)


def parse_assignment(text: str) -> tuple[str, Any]:
    """`a.b.c=VALUE` → ("a.b.c", parsed VALUE); the value is parsed as YAML (0.7, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list tree; unknown keys are caught later by validation."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            idx = _list_index(part, node, ".".join(parts[: i + 1]))
            node = node[idx]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict | list):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {where}: index must be 0..{len(node) - 1}")
    return int(part)


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def resolve_raw(
    raw: dict,
    profile: str | None = None,
    params: dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """The merged raw tree (before validation): file → profile → nested params → --set."""
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", None) or {}
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"unknown profile {profile!r}; known profiles: {known}")
        raw = deep_merge(raw, profiles[profile])
    if params:
        raw = deep_merge(raw, params)
    for text in overrides:
        key, value = parse_assignment(text)
        set_dotted(raw, key, value)
    return raw


def validate(raw: dict, origin: str = "params.yaml") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def load_config(
    path: str | Path = "params.yaml",
    profile: str | None = None,
    params: dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    origin = str(path) + (f", profile {profile}" if profile else "") + (", overrides" if overrides or params else "")
    return validate(resolve_raw(load_raw(path), profile, params, overrides), origin)
