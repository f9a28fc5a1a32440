"""Resume after a crash anywhere (issue #19): SIGKILL the pipeline at seeded points inside every long
stage, rerun it, and compare its outputs byte for byte with an uninterrupted run.

The pipeline runs in a child process (`tests/crash_driver.py`: the stages of the table in order,
each through `tasks.runner.execute`, as the flow runs them) on a tiny smoke configuration with
4 decoder layers. First an uninterrupted reference run; then the same pipeline, in the same
folder, killed again and again, each time relaunched, until a launch finishes. Two kinds of kill:

- timed, from outside: wait until the stage's own progress shows (the trainer's checkpoint at
  step >= s, the layer-wise driver's resume state at layer >= k, the evaluation's lm-eval task
  folder written by this launch), then a seeded random delay shorter than one unit of work (a
  checkpoint interval, a decoder layer, most of an evaluation), then SIGKILL to the process group:
  mid-step in training, mid-layer in pruning and GPTQ, mid-evaluation;
- in a write: the child sends itself SIGKILL just before the N-th `os.replace` (the commit of an
  atomic write) of a stage into its resume state or its outputs, N seeded: the temporary file or
  folder is complete, not yet in place (and for a folder swap, between its two renames).

Each kill must land inside its stage: its progress had shown, and it had not finished (no stamp,
no output). The final outputs (models, masks, metrics, plots, evaluation results and samples,
stamps) must equal the reference's: safetensors and other files byte for byte, JSON and JSONL
with wall-clock fields (times, throughput, the step a run resumed from) left out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "crash_driver.py"
SEED = 19

OVERRIDES = [
    "tracking.enabled=false",
    "project.threads=1",
    "pipeline.sparsities=[0.5]",
    "pipeline.dense_control=false",
    "downstream.tasks=[arithmetic]",
    "quantize.schemes=[w8a8]",  # SmoothQuant + GPTQ, layer by layer
    "quantize.finetuned=false",
    "finetune.baseline=false",
    "base.arch.num_hidden_layers=4",  # room for a kill in a layer with layers before and after it
    "base.train.steps=48",
    "base.train.checkpoint_every=4",
    "pretrain.train.steps=16",
    "pretrain.train.checkpoint_every=2",
    "finetune.dense.steps=16",
    "finetune.dense.checkpoint_every=2",
]
TARGETS = ["eval-quant-w8a8-pretrain50", "eval-ft-dense-arithmetic"]
LAYERS = 4

# Fields that measure the clock, not the computation: left out of the comparison.
WALL_CLOCK = {
    "time",  # the metrics files' time/* group
    "seconds",
    "seconds_per_decoder_layer",
    "tokens_per_s",
    "resumed_from_step",  # how far the killed run had come
    "date",
    "start_time",
    "end_time",
    "total_evaluation_time_seconds",
}


@dataclass
class Kill:
    stage: str
    kind: str  # train | layers | eval (timed, from outside) or resume | output (inside a write)
    trigger: str = ""
    delay_s: float = 0.0
    landed: str = ""
    returncode: int | None = None
    extra: dict = field(default_factory=dict)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }


def _launch(root: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(DRIVER), "--root", str(root)]
    cmd += [a for o in OVERRIDES for a in ("--set", o)] + [a for t in TARGETS for a in ("--target", t)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*cmd, *extra], cwd=REPO, env=_env(), start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )


def _finish(child: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    rc = child.wait(timeout=timeout)
    assert rc == 0, f"the pipeline failed (exit {rc}); its log:\n{log.read_text()[-4000:]}"


# --------------------------------------------------------------------------- progress, read from outside


def _trainer_step(root: Path, stage: str) -> int:
    try:
        return json.loads((root / ".resume" / stage / "trainer_state.json").read_text())["step"]
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError):
        return 0  # none yet, or the folder is being swapped


def _layers_done(root: Path, stage: str) -> int:
    from safetensors import safe_open

    try:
        with safe_open(root / ".resume" / stage / "state.safetensors", framework="pt") as f:
            return int(f.metadata()["next_layer"])
    except (FileNotFoundError, OSError, KeyError, Exception):  # noqa: BLE001  (absent, or mid-rename)
        return 0


def _done(root: Path, stage: str) -> bool:
    return (root / ".stamps" / f"{stage}.json").is_file()


class Killer:
    """Launches the pipeline and kills it, one kill per launch, recording where each landed."""

    def __init__(self, root: Path, logs: Path, rng: random.Random, reference: Path) -> None:
        self.root, self.logs, self.rng, self.ref = root, logs, rng, reference
        self.kills: list[Kill] = []
        self.ref_metrics = {s.stem: json.loads(s.read_text()) for s in (reference / "metrics").glob("*.json")}

    def _log(self) -> Path:
        return self.logs / f"launch-{len(self.kills):02d}.log"

    def _killed(self, kill: Kill, child: subprocess.Popen) -> None:
        kill.returncode = child.wait(timeout=300)
        assert kill.returncode == -signal.SIGKILL, (
            f"{kill}: the pipeline was not killed (exit {kill.returncode}):\n{self._log().read_text()[-3000:]}"
        )
        # Inside the stage: it had not finished (no stamp, and its model output not written).
        assert not _done(self.root, kill.stage), f"{kill}: the kill landed after {kill.stage} finished"
        self.kills.append(kill)

    def timed(self, stage: str, kind: str) -> None:
        """Kill from outside once `stage` shows progress, a seeded fraction of one unit of work later."""
        kill = Kill(stage, kind)
        since = time.time()
        if kind == "train":
            every = int(dict(o.split("=", 1) for o in OVERRIDES)[_train_key(stage) + ".checkpoint_every"])
            steps = int(dict(o.split("=", 1) for o in OVERRIDES)[_train_key(stage) + ".steps"])
            start = _trainer_step(self.root, stage)
            # A checkpoint at least one interval on, with two intervals left after it; in the first half
            # of the room, so that a next kill of the same stage still has room.
            last = steps - 2 * every
            assert start + every <= last, f"{stage}: no room for a kill after step {start}"
            target = self.rng.randrange(start + every, (start + every + last) // 2 + 1, every)
            step_s = self.ref_metrics[stage]["time"]["train_s"] / steps
            kill.delay_s = self.rng.uniform(0, every * step_s)
            kill.trigger = f"checkpoint at step >= {target} (of {steps}; resumed at {start})"

            def ready():
                return _trainer_step(self.root, stage) >= target
        elif kind == "layers":
            start = _layers_done(self.root, stage)
            assert start + 1 <= LAYERS - 1, f"{stage}: no room for a kill after layer {start}"
            target = self.rng.randint(start + 1, LAYERS - 1)  # at least one layer left after it
            per_layer = self.ref_metrics[stage]["time"].get("prune_per_layer_s") or _quant_layer_s(self.ref, stage)
            kill.delay_s = self.rng.uniform(0, per_layer)
            kill.trigger = f"resume state at layer >= {target} (of {LAYERS}; resumed at {start})"

            def ready():
                return _layers_done(self.root, stage) >= target
        else:  # eval: the lm-eval task folder this launch wrote (the first thing the stage does)
            model = stage.removeprefix("eval-")
            tasks_dir = self.root / ".lmeval" / model
            kill.delay_s = self.rng.uniform(0.1, 0.5) * self.ref_metrics[stage]["time"][f"stage_{stage}_s"]
            kill.trigger = "lm-eval task folder written"

            def ready():
                return tasks_dir.is_dir() and tasks_dir.stat().st_mtime >= since

        child = _launch(self.root, self._log())
        deadline = time.monotonic() + 300
        while not ready():
            assert child.poll() is None, f"{kill}: the pipeline ended before the kill point:\n{self._log().read_text()}"
            assert time.monotonic() < deadline, f"{kill}: no progress within 300 s"
            time.sleep(0.002)
        time.sleep(kill.delay_s)
        os.killpg(child.pid, signal.SIGKILL)
        if kind == "train":
            kill.landed = f"after the checkpoint of step {_trainer_step(self.root, stage)}"
        elif kind == "layers":
            kill.landed = f"with {_layers_done(self.root, stage)} layers saved"
        else:
            kill.landed = "before the results were written"
        self._killed(kill, child)
        if kind == "eval":
            assert not (self.root / "reports" / "eval" / f"{stage.removeprefix('eval-')}.json").exists()

    def in_write(self, stage: str, kind: str, counts: dict, share: float = 1.0) -> None:
        """The child kills itself just before the N-th `os.replace` of `stage` into its resume state
        (`kind` resume) or its outputs (`kind` output); N seeded among the first `share` of those of
        the reference run (a kill in an early resume write leaves work for a timed kill after it)."""
        total = counts[stage][kind]
        first = 2 if kind == "resume" else 1  # the resume kind's first is the fingerprint marker: past it
        n = self.rng.randint(first, max(first, int(total * share)))
        kill = Kill(stage, kind, trigger=f"os.replace {n} of {total} ({kind})")
        where = self.logs / f"kill-{len(self.kills):02d}.json"
        child = _launch(self.root, self._log(), "--kill-at", f"{stage}:{kind}:{n}", "--kill-log", str(where))
        self._killed(kill, child)
        kill.landed = json.loads(where.read_text())["replacing"]

    def finish(self) -> None:
        _finish(_launch(self.root, self.logs / "launch-final.log"), self.logs / "launch-final.log")


def _train_key(stage: str) -> str:
    return {"base": "base.train", "pretrain50": "pretrain.train"}.get(stage, "finetune.dense")


def _quant_layer_s(reference: Path, stage: str) -> float:
    record = json.loads((reference / "models" / stage / "quantize_layers.json").read_text())
    seconds = record["seconds_per_decoder_layer"]
    return sum(seconds) / len(seconds)


# --------------------------------------------------------------------------- comparison

COMPARED = ("models", "reports", "metrics", "plots", ".stamps")


def _is_temporary(path: Path) -> bool:
    """What an interrupted atomic write leaves beside its target (never read: not the target's name)."""
    return any(p.startswith(".") and (".tmp" in p or ".old-" in p) for p in path.parts)


def _outputs(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for top in COMPARED
        for p in (root / top).rglob("*")
        if p.is_file() and not _is_temporary(p.relative_to(root))
    }


def _without_clock(node):
    if isinstance(node, dict):
        return {k: _without_clock(v) for k, v in node.items() if k not in WALL_CLOCK}
    if isinstance(node, list):
        return [_without_clock(v) for v in node]
    return node


def _same(a: Path, b: Path) -> bool:
    left, right = a.read_bytes(), b.read_bytes()
    if left == right:
        return True
    if a.suffix == ".json":
        return _without_clock(json.loads(left)) == _without_clock(json.loads(right))
    if a.suffix == ".jsonl":
        return [_without_clock(json.loads(x)) for x in left.splitlines()] == [
            _without_clock(json.loads(x)) for x in right.splitlines()
        ]
    return False  # safetensors, PNG, tokenizer files, ...: bytes


# --------------------------------------------------------------------------- the test


@pytest.mark.slow
def test_killed_anywhere_the_rerun_pipeline_ends_bit_identical(tmp_path):
    rng = random.Random(SEED)
    root, ref, logs = tmp_path / "run", tmp_path / "reference", tmp_path / "logs"
    logs.mkdir()
    t0 = time.monotonic()

    # The uninterrupted run, in the folder the killed one will use (provenance records the root).
    counts_file = logs / "replaces.json"
    _finish(_launch(root, logs / "reference.log", "--replace-log", str(counts_file)), logs / "reference.log")
    counts = json.loads(counts_file.read_text())
    root.rename(ref)
    # The data stages are short and not under test: the killed run starts from their outputs.
    for rel in ("data", ".stamps/data.json", ".stamps/taskdata.json", "metrics/data.json", "metrics/taskdata.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ref / rel).is_dir() else shutil.copy2)(ref / rel, root / rel)

    killer = Killer(root, logs, rng, ref)
    # In table order; each launch reruns the pipeline, skipping the finished stages.
    killer.in_write("base", "resume", counts, share=0.25)  # an early checkpoint
    killer.timed("base", "train")
    killer.timed("base", "train")  # twice in a row, the second on the resumed run
    killer.in_write("base", "output", counts)  # writing the model, its metrics, or its stamp
    killer.timed("prune50", "layers")
    killer.in_write("prune50", "output", counts)
    killer.timed("pretrain50", "train")
    killer.timed("ft-dense-arithmetic", "train")
    killer.in_write("quant-w8a8-pretrain50", "resume", counts, share=0.5)
    killer.timed("quant-w8a8-pretrain50", "layers")
    killer.timed("eval-ft-dense-arithmetic", "eval")
    killer.in_write("eval-quant-w8a8-pretrain50", "output", counts)
    killer.finish()

    # What the killed writes left beside their targets was cleared by the reruns (never trusted, and
    # a killed checkpoint write leaves a model's worth of bytes).
    stale = sorted(
        p.relative_to(root).as_posix()
        for top in (*COMPARED, ".resume")
        for p in (root / top).rglob("*")
        if _is_temporary(p.relative_to(root))
    )
    assert not stale, f"temporaries of killed writes left behind: {stale}"
    expected, got = _outputs(ref), _outputs(root)
    assert got == expected, f"missing {sorted(expected - got)}, extra {sorted(got - expected)}"
    differ = sorted(rel for rel in expected if not _same(ref / rel, root / rel))
    summary = {
        "seed": SEED,
        "kills_survived": len(killer.kills),
        "outputs_compared": len(expected),
        "outputs_identical": len(expected) - len(differ),
        "differ": differ,
        "seconds": round(time.monotonic() - t0, 1),
        "kills": [k.__dict__ for k in killer.kills],
    }
    (tmp_path / "crash_anywhere.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\ncrash-anywhere: {summary['kills_survived']} kills survived, {summary['outputs_identical']} of "
        f"{summary['outputs_compared']} outputs identical to an uninterrupted run ({summary['seconds']} s)"
    )
    for k in killer.kills:
        print(f"  {k.stage:28} {k.kind:7} {k.trigger} +{k.delay_s:.3f}s -> {k.landed}")
    assert not differ, f"outputs differ from the uninterrupted run: {differ}"
