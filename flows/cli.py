"""The `sparsellama` command line.

Commands:
  sparsellama run   [--profile NAME] [--set KEY=VALUE ...]   the whole pipeline (Prefect flow)
  sparsellama stage NAME [--profile NAME] [--set ...]        one stage (what dvc.yaml calls)
  sparsellama sweep [--methods ...] [--sparsities ...] [--structures ...] [--set ...]
                                                             pruning methods x sparsities (Prefect flow)
  sparsellama benchmark [--profile NAME] [--set ...]         the kernel benchmark alone (Prefect flow)
  sparsellama serve [--host 127.0.0.1] [--port 4200]         Prefect server + deployments for the UI
  sparsellama dvc-yaml [--write | --check]                   dvc.yaml from the stage table
  sparsellama generate MODEL [PROMPT] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                       [--stop TEXT ...]                     stream a completion on the sparse CPU runtime
  sparsellama chat MODEL [--system TEXT] [...]               chat in the terminal (the tokenizer's template)
  sparsellama serve-model MODEL [--host 127.0.0.1] [--port 8000]
                                                             an OpenAI-compatible HTTP server
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

import tasks  # noqa: F401  (environment defaults first)
from sparsify.errors import SparsellamaError
from sparsify.evaluation.sandbox import SandboxUnavailable
from tasks.config import load_config

DEFAULT_MAX_TOKENS = 256  # generate / chat, when --max-tokens is not given


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="a profile from the file's `profiles:` (e.g. smoke)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any key, e.g. --set prune.sparsity=0.7 (repeatable)",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a pipeline output folder: the sparse format (or a folder with a sparse/ "
        "one) or a Hugging Face checkpoint",
    )
    p.add_argument(
        "--max-context", type=int, default=None, help="tokens of context (default: the model's max_position_embeddings)"
    )
    p.add_argument(
        "--min-sparsity",
        type=float,
        default=0.3,
        help="HF folders: decoder Linears at least this sparse run on the sparse kernels",
    )
    p.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"tokens to generate at most (default: {DEFAULT_MAX_TOKENS}, or what the context leaves)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible samples)")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end the text before this string (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsellama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as the sparse-llama Prefect flow")
    run.add_argument(
        "--until",
        dest="targets",
        action="append",
        default=None,
        metavar="STAGE",
        help="run only this stage and the stages it needs (repeatable)",
    )
    _config_args(run)
    sweep = sub.add_parser("sweep", help="prune the base model with each method at each sparsity (Prefect flow)")
    sweep.add_argument(
        "--methods",
        nargs="+",
        default=["magnitude", "wanda", "sparsegpt"],
        help="prune.method values (magnitude, wanda, sparsegpt, admm), each optionally with "
        "+owl and/or +refine, e.g. admm+owl sparsegpt+refine",
    )
    sweep.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    sweep.add_argument(
        "--structures",
        nargs="+",
        default=["unstructured", "2:4"],
        help="unstructured (at each sparsity) and/or N:M patterns",
    )
    _config_args(sweep)
    _config_args(sub.add_parser("benchmark", help="run the kernel benchmark again (Prefect flow)"))
    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("name")
    _config_args(stage)
    srv = sub.add_parser("serve", help="start a local Prefect server and serve the flows for the Prefect UI")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=4200)
    srv.add_argument("--config", default="params.yaml")
    gen = sub.add_parser("generate", help="stream a completion of PROMPT (or stdin) on the sparse CPU runtime")
    _model_args(gen)
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="chat with a model in the terminal (its tokenizer's chat template)")
    _model_args(chat)
    chat.add_argument("--system", default=None, help="a system message first")
    _sampling_args(chat)
    srvm = sub.add_parser("serve-model", help="serve a model over an OpenAI-compatible HTTP API")
    _model_args(srvm)
    srvm.add_argument("--host", default="127.0.0.1")
    srvm.add_argument("--port", type=int, default=8000)
    srvm.add_argument("--served-name", default=None, help="the model id clients send (default: the folder name)")
    srvm.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    srvm.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch (default 64)")
    srvm.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens per step over the joining requests (default 512): longer prompts are "
        "prefilled over several steps while the others keep decoding",
    )
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


def _load_engine(args: argparse.Namespace, **engine_options):
    import torch

    from sparsify.inference.engine import Engine
    from sparsify.inference.loading import load_runtime_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_runtime_model(args.model, min_sparsity=args.min_sparsity)
    return loaded, Engine(loaded.model, loaded.tokenizer, max_context=args.max_context, **engine_options)


def _sampling(args: argparse.Namespace):
    from sparsify.inference.generation import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _fit(params, args: argparse.Namespace, engine, prompt_len: int):
    """Without --max-tokens, generate at most what the context leaves (an explicit value beyond it is an error)."""
    if args.max_tokens is not None:
        return params
    return dataclasses.replace(params, max_tokens=max(1, min(DEFAULT_MAX_TOKENS, engine.max_context - prompt_len)))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(result) -> None:
    print(
        f"\n[{len(result.token_ids)} tokens ({result.finish_reason}) in {result.seconds:.2f} s: "
        f"{result.tokens_per_second:.1f} tokens/s decoding; prompt {result.prompt_tokens} tokens, "
        f"first token after {result.time_to_first_token:.2f} s]",
        file=sys.stderr,
    )


def generate_command(args: argparse.Namespace) -> int:
    from sparsify.inference.engine import stream_generation

    params = _sampling(args)  # bad options fail before the model loads
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    loaded, engine = _load_engine(args, max_batch=1, max_queue=0)
    ids = loaded.tokenizer(prompt).input_ids
    try:
        result = stream_generation(engine, ids, _fit(params, args, engine, len(ids)), _write)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    finally:
        engine.stop()
    _write("\n")
    _report(result)
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from sparsify.inference.engine import ContextLengthError, stream_generation
    from sparsify.inference.generation import chat_prompt_ids

    params = _sampling(args)
    loaded, engine = _load_engine(args, max_batch=1, max_queue=0)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    chat_prompt_ids(loaded.tokenizer, messages + [{"role": "user", "content": ""}])  # no template: fail now
    interactive = sys.stdin.isatty()
    print(f"chatting with {loaded.path} (empty line or Ctrl-D ends)", file=sys.stderr)
    try:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line.strip():
                break
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = chat_prompt_ids(loaded.tokenizer, messages)
            try:
                result = stream_generation(engine, ids, _fit(params, args, engine, len(ids)), _write)
            except ContextLengthError as err:  # the conversation outgrew the context: start a new one
                print(f"[{err}; the conversation starts over]", file=sys.stderr)
                messages = messages[:1] if args.system else []
                continue
            _write("\n")
            _report(result)
            messages.append({"role": "assistant", "content": result.text})
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    finally:
        engine.stop()
    return 0


def serve_model_command(args: argparse.Namespace) -> int:
    from sparsify.inference.server import serve

    loaded, engine = _load_engine(
        args, max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk
    )
    serve(engine, name=args.served_name or loaded.name, host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore"):  # Prefect's client logs every API request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "generate":
            return generate_command(args)
        if args.command == "chat":
            return chat_command(args)
        if args.command == "serve-model":
            return serve_model_command(args)
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

            prune_sweep(
                methods=args.methods,
                sparsities=args.sparsities,
                structures=args.structures,
                profile=args.profile,
                overrides=args.overrides,
                config_path=args.config,
            )
            return 0
        if args.command == "benchmark":
            load_config(args.config, args.profile, overrides=args.overrides)
            from flows.pipeline import benchmark

            benchmark(profile=args.profile, overrides=args.overrides, config_path=args.config)
            return 0
    except (SparsellamaError, SandboxUnavailable) as exc:
        # Only the project's own errors (config, data, user input, a busy root, the refusal to run generated
        # code unisolated) are one line: their message says what to fix. Anything else is a bug or an
        # environment failure and keeps its traceback. (SandboxUnavailable cannot derive from
        # SparsellamaError: sandbox.py also runs alone, as the runner inside the sandbox.)
        print(f"sparsellama: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
