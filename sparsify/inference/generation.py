"""Decoding, one sequence at a time: sampling options, the next-token choice, incremental text.

Pure pieces the engine (:mod:`sparsify.inference.engine`) composes for every sequence of a batch:

* :class:`SamplingParams` — greedy (``temperature == 0``) or sampling with temperature, top-k,
  top-p and a seed; stop strings; max tokens. Bad values raise ValueError naming the field.
* :func:`next_token` — one token from one row of logits.
* :class:`IncrementalDetokenizer` — the text each new token adds. A token may hold part of a
  multi-byte character (byte-level BPE, SentencePiece byte fallback): its text is held back until
  the character is complete, and decoding a short window of recent tokens keeps each step
  O(1) while giving the same text as decoding the whole sequence.
* :class:`TextStream` — detokenizer + stop strings: what may be shown now (text that could still
  become the start of a stop string is held back), and the final text, cut before the stop string.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsify.errors import UserInputError

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: no limit
    seed: int | None = None  # None: a fresh random stream per sequence
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserInputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also catches nan
            raise UserInputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserInputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserInputError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token id from ``logits [vocab]``: argmax when greedy, else a draw after temperature,
    top-k and top-p (in that order, as transformers applies them)."""
    if params.greedy:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


_BYTE_FALLBACK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte-fallback tokens (``<0xE2>``...) when the tokenizer's decoder uses them
    (Llama 2), else empty. Cached per tokenizer."""
    try:
        return _BYTE_FALLBACK[tokenizer]
    except (KeyError, TypeError):
        pass
    ids: frozenset[int] = frozenset()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteFallback" in json.dumps(json.loads(backend.to_str()).get("decoder")):
        ids = frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))
    with contextlib.suppress(TypeError):
        _BYTE_FALLBACK[tokenizer] = ids
    return ids


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence (special tokens skipped).

    Keeps two offsets into the ids (as vLLM does): ``prefix`` starts the window that is decoded
    for context, ``read`` ends the part already turned into text. A delta is released only when
    it does not end in U+FFFD (an incomplete multi-byte character). With SentencePiece byte
    fallback, a run of byte tokens is decoded as one group (a later invalid byte turns the whole
    run into U+FFFDs), so nothing is released while the last token is a byte token: the streamed
    text then always equals one decode of all the ids.
    """

    def __init__(self, tokenizer, window: int = 5) -> None:
        # The generated ids are decoded on their own (not after the prompt), as
        # ``tokenizer.decode(output[prompt_len:])`` does for transformers' users.
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.window = window
        self._byte_ids = byte_fallback_ids(tokenizer)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self.ids[-1] in self._byte_ids:
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before) :]
            self.read = len(self.ids)
            # Both decodes above start at the same token, so a decoder that strips a leading space
            # (SentencePiece) strips it from both alike and the delta stays exact.
            self.prefix = max(self.prefix, self.read - self.window)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character, shown as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.read = len(self.ids)
        return after[len(before) :]


@dataclass
class TextStream:
    """The text of one sequence as its tokens arrive, with stop strings applied.

    ``push(token) -> (delta, stopped)``: ``delta`` is text safe to show now; ``stopped`` is True
    once a stop string appeared (the text is then final and ends before it). ``finish()`` releases
    what was held back when the sequence ends for another reason.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    text: str = ""
    shown: int = 0
    stopped: bool = False
    _detok: IncrementalDetokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _release(self, upto: int) -> str:
        upto = max(self.shown, upto)  # never a negative index (the text may be shorter than the hold-back)
        delta = self.text[self.shown : upto]
        self.shown = upto
        return delta

    def _add(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        start = max(0, len(self.text) - self._hold)  # a stop string may straddle the old end
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._hold), False

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._add(self._detok.push(token_id))

    def finish(self) -> str:
        """Everything not yet shown (call once the sequence has ended)."""
        if not self.stopped:
            delta, _ = self._add(self._detok.flush())
            if self.stopped:
                return delta
            return delta + self._release(len(self.text))
        return self._release(len(self.text))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the assistant's turn.

    The template writes its own special tokens (BOS...), so none are added again.
    ValueError if the tokenizer has no chat template (a base model).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            "the tokenizer has no chat template (a base model?): use plain completion "
            "(`sparsellama generate`, /v1/completions) instead"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
