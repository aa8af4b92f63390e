"""The bilingual (Chinese + English) tokenizer: load any Hugging Face ``tokenizer.json``, train our own.

GLM-4 tokenizes with byte-level BPE: a tiktoken-style regex splits text into pre-tokens, which are
mapped to bytes and merged. Special tokens (``[gMASK]``, ``<sop>``, ``<|user|>``...) are added
tokens looked up by name. Plain text never encodes to a special token unless the caller asks for it:
a user typing ``<|assistant|>`` must not be able to forge a turn (injection guard).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import OpenGLMError
from ..paths import resolve_checkpoint
from ..utils import atomic_write_text

# GLM special tokens in GLM-4's order; a trained tokenizer gives them ids 0..9 in this order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]

# GLM-4's split (the GPT-4 one) but with single digits, so a small vocabulary spends no entries on
# digit groups and numbers tokenize uniformly. Han characters are letters (\p{L}): a run of them
# between punctuation is one pre-token, inside which BPE learns words and common phrases.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with GLM's conventions: no automatic BOS/EOS, special tokens by name."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        # A copy that treats special-token strings in the input as plain text. Two copies, not one
        # with a flag flipped per call, so concurrent encodes never see each other's mode.
        self._plain = HFTokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.special_ids = {
            t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special
        }

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Read a Hugging Face ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise OpenGLMError(f"no tokenizer file at {str(path)!r}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise OpenGLMError(f"{path} is not a valid tokenizer.json: {e}") from e

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` for ``transformers``; returns the first."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        atomic_write_text(path, self._tok.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if "<|endoftext|>" in self.special_ids:
            config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.token_id("<|endoftext|>")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it are plain text unless ``allow_special``."""
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """``encode`` of each text, computed in parallel by the Rust library."""
        tok = self._tok if allow_special else self._plain
        return [e.ids for e in tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        """The id of token ``name`` (e.g. ``"[gMASK]"``)."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise OpenGLMError(f"tokenizer has no token {name!r}")
        return i

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(i)
        if token is None:
            raise OpenGLMError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return token

    def check_glm_special_tokens(self, names: Iterable[str] = SPECIAL_TOKENS) -> None:
        """Raise if any of ``names`` is not a special token of this tokenizer (GLM infilling and chat need them)."""
        missing = [n for n in names if n not in self.special_ids]
        if missing:
            raise OpenGLMError(
                f"tokenizer lacks the GLM special token(s) {', '.join(missing)}; "
                f"train one with `openglm tokenizer train` or use a GLM tokenizer"
            )


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, a directory holding one, or a bundled checkpoint name."""
    path = resolve_checkpoint(path_or_name)
    if path.is_dir():
        path = path / "tokenizer.json"
    return Tokenizer.from_file(path)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with ``SPECIAL_TOKENS`` as ids ``0..9``.

    Every byte is in the vocabulary, so any text encodes and decodes back exactly. The vocabulary may
    come out smaller than ``vocab_size`` when the text has fewer pairs seen ``min_frequency`` times.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise OpenGLMError(
            f"vocab size {vocab_size} is too small: the {len(alphabet)} bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens alone need {len(alphabet) + len(SPECIAL_TOKENS)}"
        )
    texts = iter(texts)
    first = next((t for t in texts if t), None)
    if first is None:
        raise OpenGLMError("no text to train the tokenizer on")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(chain([first], texts), trainer)
    return Tokenizer(tok)


def read_texts(paths: Iterable[str | Path], max_chars: int | None = None, progress: bool = False) -> Iterator[str]:
    """Stream the texts of ``.txt`` files (one text a line) and ``.jsonl`` files (a ``"text"`` field a line).

    Either may be ``.gz`` or ``.xz`` compressed (read as ``openglm data prepare`` reads them). Stops
    after ``max_chars`` characters in all. With ``progress``, a bar counts the bytes read from disk.
    """
    from .prepare import read_documents

    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise OpenGLMError(f"no input file at {str(p)!r}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="reading")
    left = max_chars
    try:
        for p in paths:
            for text, _ in read_documents(p, bar=bar):
                if left is not None:
                    if left <= 0:
                        return
                    text = text[:left]
                    left -= len(text)
                yield text
    finally:
        if bar is not None:
            bar.close()
