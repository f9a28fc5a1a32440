"""Run the pipeline's stages in a child process, for the crash-anywhere harness (test_crash_anywhere.py).

    python tests/crash_driver.py --root ROOT --set KEY=VALUE ... --target STAGE ...

runs the stages the targets need, in the stage table's order, each through
`tasks.runner.execute` without `force`: what the `sparse-llama` flow does for each stage
(a stage whose outputs exist with the same fingerprint is skipped, an interrupted one
continues from its `.resume/<stage>` state), minus Prefect, whose server would cost
seconds per rerun. Rerunning the driver after a kill is rerunning the pipeline.

Every `os.replace` into the project root (the commit of every atomic write: output files and
folders, resume state, metrics, stamps, and the two renames that swap a folder into place) is
counted per stage and kind into `--replace-log` (JSON): kind `resume` under `.resume/`, `output`
elsewhere. With `--kill-at STAGE:KIND:N` the process sends itself SIGKILL just before the N-th
`os.replace` of that kind in STAGE, after writing its target to `--kill-log`: the temporary file
or folder is complete and not yet in place, the middle of a write. A real kill, as from outside:
nothing after it runs, no `finally`, no `atexit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--target", dest="targets", action="append", required=True)
    parser.add_argument("--replace-log")
    parser.add_argument("--kill-at")
    parser.add_argument("--kill-log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tasks.common import root_lock
    from tasks.config import load_config
    from tasks.runner import execute
    from tasks.stages import stages, upstream

    cfg = load_config(
        REPO / "params.yaml", profile=args.profile, overrides=[f"project.root={args.root}", *args.overrides]
    )
    table = stages(cfg)
    by_name = {s.name: s for s in table}
    needed: set[str] = set()
    todo = list(args.targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += upstream(table, by_name[name])

    root = cfg.root.resolve()
    current = {"stage": None}
    counts: dict[str, dict[str, int]] = {}
    kill_stage, kill_kind, kill_n = (args.kill_at or "::0").split(":")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        target = Path(dst).resolve()
        if target.is_relative_to(root):
            rel = target.relative_to(root)
            kind = "resume" if rel.parts[0] == ".resume" else "output"
            seen = counts.setdefault(current["stage"], {"resume": 0, "output": 0})
            seen[kind] += 1
            if (current["stage"], kind, seen[kind]) == (kill_stage, kill_kind, int(kill_n)):
                Path(args.kill_log).write_text(json.dumps({"replacing": rel.as_posix()}))
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    with root_lock(cfg.root):
        for stage in table:
            if stage.name in needed:
                current["stage"] = stage.name
                execute(stage, cfg, table=table)
                current["stage"] = None
    os.replace = real_replace
    if args.replace_log:
        Path(args.replace_log).write_text(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
