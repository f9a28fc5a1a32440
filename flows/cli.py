"""The `sparsellama` command line.

  sparsellama run   [--profile NAME] [--set KEY=VALUE ...]   the whole pipeline (Prefect flow)
  sparsellama stage NAME [--profile NAME] [--set ...]        one stage (what dvc.yaml calls)
  sparsellama sweep [--methods ...] [--sparsities ...] [--structures ...] [--set ...]
                                                             pruning methods x sparsities (Prefect flow)
  sparsellama benchmark [--profile NAME] [--set ...]         the kernel benchmark alone (Prefect flow)
  sparsellama serve [--host 127.0.0.1] [--port 4200]         Prefect server + deployments for the UI
  sparsellama dvc-yaml [--write | --check]                   dvc.yaml from the stage table
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

import tasks  # noqa: F401  (environment defaults first)
from sparsify.config import ConfigError, load_config
from sparsify.data import DataError
from tasks.common import RootBusy


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="a profile from the file's `profiles:` (e.g. smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set prune.sparsity=0.7 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsellama", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as the sparse-llama Prefect flow")
    run.add_argument("--until", dest="targets", action="append", default=None, metavar="STAGE",
                     help="run only this stage and the stages it needs (repeatable)")
    _config_args(run)
    sweep = sub.add_parser("sweep", help="prune the base model with each method at each sparsity (Prefect flow)")
    sweep.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    sweep.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    sweep.add_argument("--structures", nargs="+", default=["unstructured", "2:4"],
                       help="unstructured (at each sparsity) and/or N:M patterns")
    _config_args(sweep)
    _config_args(sub.add_parser("benchmark", help="run the kernel benchmark again (Prefect flow)"))
    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("name")
    _config_args(stage)
    srv = sub.add_parser("serve", help="start a local Prefect server and serve the flows for the Prefect UI")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=4200)
    srv.add_argument("--config", default="params.yaml")
    dvc = sub.add_parser("dvc-yaml", help="print dvc.yaml generated from the stage table")
    dvc.add_argument("--config", default="params.yaml", help="parameters file (default: params.yaml)")
    mode = dvc.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write dvc.yaml")
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from the table")
    return parser


def render_dvc_yaml(config: str | Path = "params.yaml") -> str:
    from tasks.stages import dvc_yaml

    header = "# Generated from tasks/stages.py by `sparsellama dvc-yaml --write`; edit the table, not this file.\n"
    return header + yaml.safe_dump(dvc_yaml(load_config(config)), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # Prefect's client logs every API request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "dvc-yaml":
            text = render_dvc_yaml(args.config)
            if args.write:
                Path("dvc.yaml").write_text(text)
            elif args.check:
                if not Path("dvc.yaml").is_file() or Path("dvc.yaml").read_text() != text:
                    print("dvc.yaml is out of date; run `sparsellama dvc-yaml --write`", file=sys.stderr)
                    return 1
            else:
                sys.stdout.write(text)
            return 0
        if args.command == "stage":
            from tasks import stages
            from tasks.runner import execute

            cfg = load_config(args.config, args.profile, overrides=args.overrides)
            execute(stages.get(cfg, args.name), cfg, force=True)  # under dvc, DVC decides what reruns
            return 0
        if args.command == "serve":
            from flows.serve import serve

            serve(args.host, args.port, args.config)
            return 0
        if args.command == "run":
            load_config(args.config, args.profile, overrides=args.overrides)  # fail fast, before Prefect starts
            from flows.pipeline import sparse_llama

            sparse_llama(profile=args.profile, overrides=args.overrides, config_path=args.config, targets=args.targets)
            return 0
        if args.command == "sweep":
            load_config(args.config, args.profile, overrides=args.overrides)
            from flows.pipeline import prune_sweep

            prune_sweep(methods=args.methods, sparsities=args.sparsities, structures=args.structures,
                        profile=args.profile, overrides=args.overrides, config_path=args.config)
            return 0
        if args.command == "benchmark":
            load_config(args.config, args.profile, overrides=args.overrides)
            from flows.pipeline import benchmark

            benchmark(profile=args.profile, overrides=args.overrides, config_path=args.config)
            return 0
    except (ConfigError, DataError, ValueError, FileNotFoundError, RootBusy) as exc:
        print(f"sparsellama: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
