"""`sparsellama generate` and `sparsellama chat` on a sparse-format folder: the streamed text equals
transformers' greedy generate on the dense model holding the same zeros."""

from __future__ import annotations

import io

import pytest
import torch

from flows.cli import main
from tests.serve_fixtures import (
    extension,  # noqa: F401  (a pytest fixture)
    sparse_llama,
    tiny_tokenizer,
    tokenizer,  # noqa: F401  (a pytest fixture)
    write_sparse_folder,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    dense, masks = sparse_llama()
    return dense, write_sparse_folder(dense, masks, tmp_path_factory.mktemp("cli") / "model", tokenizer)


def hf_text(model, tokenizer, ids: list[int], max_new: int) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=304)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_generate_streams_the_greedy_text(folder, tokenizer, capsys):
    dense, path = folder
    prompt = "class Parser:\n    def"
    assert main(["generate", str(path), prompt, "--max-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out == hf_text(dense, tokenizer, tokenizer(prompt).input_ids, 20) + "\n"
    assert "20 tokens (length)" in err and "tokens/s" in err


def test_generate_reads_stdin_samples_with_a_seed_and_stops(folder, monkeypatch, capsys):
    _, path = folder
    runs = []
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("import os"))
        assert (
            main(
                [
                    "generate",
                    str(path),
                    "--max-tokens",
                    "12",
                    "--temperature",
                    "0.8",
                    "--top-p",
                    "0.9",
                    "--top-k",
                    "50",
                    "--seed",
                    "7",
                ]
            )
            == 0
        )
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and len(runs[0]) > 1
    text = runs[0].rstrip("\n")
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # the text ends before the stop string's first appearance
    monkeypatch.setattr("sys.stdin", io.StringIO("import os"))
    assert (
        main(
            [
                "generate",
                str(path),
                "--max-tokens",
                "12",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
                "--top-k",
                "50",
                "--seed",
                "7",
                "--stop",
                "never-there",
                "--stop",
                stop,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == text[: text.index(stop)] + "\n" and "(stop)" in err


def test_chat_uses_the_template_and_keeps_the_history(folder, tokenizer, monkeypatch, capsys):
    dense, path = folder
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n\n"))
    assert main(["chat", str(path), "--system", "be brief", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    first, second = out.split("\n")[:2]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    assert ids[0] == 300 and ids.count(300) == 1  # one BOS: the template's
    assert first == hf_text(dense, tokenizer, ids, 8)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    assert second == hf_text(dense, tokenizer, ids, 8)
    assert err.count("tokens/s") == 2


def test_errors_are_one_line(folder, tmp_path, tokenizer, capsys):
    dense, path = folder
    assert main(["generate", str(tmp_path / "missing"), "x"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", str(path), "x", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", str(path), "x", "--max-tokens", "1000"]) == 2
    assert "exceed the context of 256" in capsys.readouterr().err
    base = tmp_path / "base"
    dense.save_pretrained(base)
    plain = tiny_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(base)
    assert main(["chat", str(base)]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_without_max_tokens_the_context_bounds_the_answer(folder, tokenizer, monkeypatch, capsys):
    _, path = folder
    prompt = "for i in range(10):"
    n = len(tokenizer(prompt).input_ids)
    assert main(["generate", str(path), prompt, "--max-context", str(n + 5)]) == 0
    assert "[5 tokens (length)" in capsys.readouterr().err
    # chat: a turn that no longer fits restarts the conversation (the system message stays) and goes on
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n" + "word " * 40 + "\nhi\n\n"))
    assert main(["chat", str(path), "--system", "s", "--max-context", "40", "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "the conversation starts over" in err and err.count("tokens/s") == 2
