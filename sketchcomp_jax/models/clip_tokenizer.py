"""CLIP byte-level BPE tokenizer, without torch or transformers, reading a Hugging Face tokenizer folder.

It reproduces transformers' (python, "slow") `CLIPTokenizer` as the LDM `FrozenCLIPEmbedder` calls it,
`tokenizer(texts, truncation=True, max_length=77, padding="max_length")`:

1. The text is split around the special-token strings (`<|startoftext|>`, `<|endoftext|>`, and the pad
   / unk strings); each of those maps straight to its id.
2. Every other piece is cleaned. With `ftfy` installed (the original environment had it, through
   openai's `clip` package) that is `ftfy.fix_text`, whitespace runs -> one space, strip, lower-case.
   Without it transformers falls back to BERT's `BasicTokenizer(strip_accents=False,
   do_split_on_punc=False)`: control characters dropped, spaces put around CJK ideographs, NFC, split
   on whitespace, lower-case, re-joined with single spaces. `text_cleanup` picks one explicitly.
3. CLIP's regex splits the text into contractions, letter runs, single digits and runs of other
   non-space characters. Each piece is UTF-8 encoded and its bytes are mapped to printable unicode
   characters (GPT-2's byte-to-unicode table), its last symbol gets the `</w>` end-of-word suffix, and
   BPE merges the adjacent pair of lowest merge rank until none applies. This step runs in the
   `tokenizers` library (the Rust BPE of transformers' fast `CLIPTokenizer`, configured as CLIP's
   `tokenizer.json` is: `Split` on CLIP's regex, `ByteLevel` without its own regex, `BPE` with the `</w>`
   suffix); steps 1, 2 and 4 stay here because the fast tokenizer's normaliser is not ftfy / BERT's cleanup.
4. `<|startoftext|> tokens[:max_length-2] <|endoftext|>`, then the pad token up to `max_length`.

The folder holds `vocab.json` and `merges.txt` (as `openai/clip-vit-large-patch14` or an SD pipeline's
`tokenizer/`; a pipeline root with a `tokenizer/` sub-folder is accepted too) and optionally
`tokenizer_config.json` / `special_tokens_map.json`, from which the special tokens and
`model_max_length` are read (the latter overriding the former, as transformers 4.x did). SD v1 pads with
`<|endoftext|>` (the default); SD v2 pads with `!`. Added tokens (`added_tokens.json`, textual
inversion embeddings) are not supported.

Differences from transformers, all outside what its own files produce: a `merges.txt` header line is
skipped only if it starts with `#version` (transformers' python tokenizer drops the first line
unconditionally, and reads at most 48,894 merges, the size of CLIP's file).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import unicodedata
from typing import Literal, Sequence

import numpy as np
import regex

__all__ = [
    "CLIPTokenizer",
    "TokenizerFileError",
    "TokenizerFolderNotFoundError",
    "basic_cleanup",
    "bytes_to_unicode",
    "ftfy_cleanup",
    "learn_bpe",
    "write_tokenizer_folder",
]

TextCleanup = Literal["auto", "ftfy", "basic"]

DEFAULT_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# CLIP's pre-tokeniser: the two special strings, English contractions, letter runs, *single* digits,
# runs of anything else that is not whitespace. Applied to lower-cased text (IGNORECASE as in CLIP).
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The same without the special strings (split off before) and case-sensitive (the text is lower-cased), for the
# `tokenizers` pre-tokeniser.
_PRETOKENIZE_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE_RUN = regex.compile(r"\s+")


class TokenizerFolderNotFoundError(FileNotFoundError):
    """The tokenizer folder, or a file it must hold (vocab.json, merges.txt), does not exist."""


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be used (bad JSON, malformed merge line, token not in the vocab)."""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (256 entries).

    The printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes
    (controls, space, soft hyphen, ...) map, in byte order, to U+0100, U+0101, ... so that no BPE
    symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --------------------------------------------------------------------------------------------------
# text cleanup
# --------------------------------------------------------------------------------------------------


def ftfy_cleanup(text: str) -> str:
    """transformers' CLIP cleanup when ftfy is installed: `fix_text`, whitespace runs -> ' ', strip, lower."""
    import ftfy

    return _WHITESPACE_RUN.sub(" ", ftfy.fix_text(text)).strip().lower()


def _is_cjk_ideograph(cp: int) -> bool:
    # BERT's "Chinese character" ranges: the CJK Unified Ideographs blocks and compatibility ideographs
    # (not Hiragana/Katakana/Hangul, which are written with spaces between words).
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_cleanup(text: str) -> str:
    """transformers' CLIP cleanup without ftfy: `" ".join(BasicTokenizer(strip_accents=False,
    do_split_on_punc=False).tokenize(text))`.

    NUL, U+FFFD and every character of a category C* (control, format, private use, unassigned,
    surrogate; tab/newline/CR count as spaces) are dropped; space separators become ' '; CJK ideographs get spaces around them; NFC; whitespace split;
    each word lower-cased (accents kept); words joined by one space.
    """
    chars = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            chars.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk_ideograph(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    words = unicodedata.normalize("NFC", "".join(chars)).split()
    return " ".join(word.lower() for word in words)


def _resolve_cleanup(text_cleanup: TextCleanup) -> str:
    if text_cleanup == "auto":
        try:
            import ftfy  # noqa: F401
        except ImportError:
            return "basic"
        return "ftfy"
    if text_cleanup == "ftfy":
        try:
            import ftfy  # noqa: F401
        except ImportError:
            raise ImportError("text_cleanup='ftfy' needs the ftfy package: pip install ftfy") from None
        return "ftfy"
    if text_cleanup == "basic":
        return "basic"
    raise ValueError(f"text_cleanup must be 'auto', 'ftfy' or 'basic', got {text_cleanup!r}")


# --------------------------------------------------------------------------------------------------
# BPE (the `tokenizers` library)
# --------------------------------------------------------------------------------------------------


def _bpe_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]], unk_token: str, source: str):
    """Pre-tokeniser + byte-level BPE as in CLIP's `tokenizer.json`, for text that is already cleaned (so no
    normaliser) and holds no special-token strings (so no added tokens)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token=unk_token,
                         continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD, fuse_unk=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception for inconsistent files
        raise TokenizerFileError(f"{source}: vocab.json and merges.txt do not fit together ({e})") from None
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_PRETOKENIZE_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


# --------------------------------------------------------------------------------------------------
# folder reading
# --------------------------------------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not valid JSON ({e}); re-download the tokenizer files") from None
    except UnicodeDecodeError:
        raise TokenizerFileError(f"{path}: not UTF-8 text; re-download the tokenizer files") from None


def _token_content(value: object, path: pathlib.Path, key: str) -> str | None:
    """A special token entry: a string, or an `AddedToken` dict with 'content'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerFileError(f"{path}: {key} must be a string or an object with 'content', got {value!r}")


def _resolve_folder(path: str | os.PathLike) -> pathlib.Path:
    from sketchcomp_jax.paths import as_path, is_remote

    folder = as_path(path) if is_remote(path) else pathlib.Path(path).expanduser()
    if not folder.exists():
        raise TokenizerFolderNotFoundError(
            f"CLIP tokenizer folder not found: {folder}; pass the folder holding vocab.json and merges.txt "
            "(e.g. a download of openai/clip-vit-large-patch14, or an SD pipeline's tokenizer/ folder)"
        )
    if not folder.is_dir():
        raise TokenizerFolderNotFoundError(
            f"CLIP tokenizer path {folder} is a file; pass the folder holding vocab.json and merges.txt"
        )
    if not (folder / "vocab.json").exists() and (folder / "tokenizer" / "vocab.json").exists():
        folder = folder / "tokenizer"  # an SD pipeline root
    return folder


def _read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TokenizerFileError(f"{path}: not UTF-8 text; re-download the tokenizer files") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if number == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(
                f"{path}, line {number}: a merge line must hold two symbols separated by a space, got {line!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------------


class CLIPTokenizer:
    """CLIP BPE tokenizer: `tokenizer(texts)` -> (B, max_length) int32 ids, padded and truncated.

    Build it with `CLIPTokenizer.from_folder(path)`, or directly from a vocabulary and a ranked merge
    list. `text_cleanup`: 'auto' (ftfy if importable, as transformers does), 'ftfy' or 'basic'.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        max_length: int = DEFAULT_MAX_LENGTH,
        text_cleanup: TextCleanup = "auto",
        source: str = "vocabulary",
    ):
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerFileError(f"{source}: the vocabulary must map token strings to integer ids")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.max_length = int(max_length)
        self.cleanup = _resolve_cleanup(text_cleanup)
        pad_token = eos_token if pad_token is None else pad_token
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        for role, token in self.special_tokens.items():
            if token not in self.vocab:
                raise TokenizerFileError(
                    f"{source}: {role} {token!r} is not in the vocabulary; check tokenizer_config.json / "
                    "special_tokens_map.json against vocab.json"
                )
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.pad_token_id = self.vocab[pad_token]
        self.unk_token_id = self.vocab[unk_token]
        # Longest first so that no special string is split by a shorter one that it contains.
        specials = sorted(set(self.special_tokens.values()), key=len, reverse=True)
        self._special_split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self._bpe = _bpe_tokenizer(self.vocab, merges, unk_token, source)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, *, text_cleanup: TextCleanup = "auto", max_length: int | None = None
    ) -> "CLIPTokenizer":
        """Reads `vocab.json`, `merges.txt` and, when present, `tokenizer_config.json` then
        `special_tokens_map.json` (special tokens, `model_max_length`). `max_length` overrides the
        folder's `model_max_length` (default 77)."""
        folder = _resolve_folder(path)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for needed in (vocab_path, merges_path):
            if not needed.is_file():
                present = sorted(p.name for p in folder.iterdir())
                raise TokenizerFolderNotFoundError(
                    f"{needed.name} not found in the CLIP tokenizer folder {folder} (it holds: "
                    f"{', '.join(present) or 'nothing'}); a CLIP tokenizer needs vocab.json and merges.txt"
                )
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise TokenizerFileError(f"{vocab_path}: must hold a JSON object mapping tokens to ids")
        merges = _read_merges(merges_path)
        tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        folder_max_length = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config_path = folder / name
            if not config_path.is_file():
                continue
            raw = _read_json(config_path)
            if not isinstance(raw, dict):
                raise TokenizerFileError(f"{config_path}: must hold a JSON object")
            for key in tokens:
                content = _token_content(raw.get(key), config_path, key)
                if content is not None:
                    tokens[key] = content
            # Configs without a limit store a huge sentinel (int(1e30)); CLIP's positions cap at 77.
            length = raw.get("model_max_length")
            if isinstance(length, int) and 2 <= length <= 1_000_000:
                folder_max_length = length
        return cls(
            vocab,
            merges,
            **tokens,
            max_length=max_length or folder_max_length or DEFAULT_MAX_LENGTH,
            text_cleanup=text_cleanup,
            source=str(folder),
        )

    # ----------------------------------------------------------------------------------------------

    def clean(self, text: str) -> str:
        """The cleanup step (see the module docstring) for one piece of text without special tokens."""
        return ftfy_cleanup(text) if self.cleanup == "ftfy" else basic_cleanup(text)

    def tokenize_ids(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIP tokenizer expects str, got {type(text).__name__}")
        ids: list[int] = []
        for i, piece in enumerate(self._special_split.split(text)):
            if i % 2:  # a special-token string, kept by the capturing split
                ids.append(self.vocab[piece])
                continue
            cleaned = self.clean(piece)
            if cleaned:
                ids.extend(self._bpe.encode(cleaned, add_special_tokens=False).ids)
        return ids

    def encode(self, text: str, max_length: int | None = None, pad: bool = True) -> list[int]:
        """`<|startoftext|> ids <|endoftext|>`, truncated to `max_length` (the eos kept), then padded."""
        max_length = self.max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        ids = [self.bos_token_id, *self.tokenize_ids(text)[: max_length - 2], self.eos_token_id]
        if pad:
            ids += [self.pad_token_id] * (max_length - len(ids))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """One text or a list -> int32 ids (B, max_length) (B = 1 for a single string)."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else max_length
        return np.asarray([self.encode(t, length) for t in texts], dtype=np.int32).reshape(len(texts), length)


def learn_bpe(texts: Sequence[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format vocabulary learned from `texts` (for data sets without a released tokenizer, e.g. the
    synthetic cartoon set's tags): the 256 byte symbols and their `</w>` forms, then up to `num_merges`
    most frequent pair merges (ties broken by the pair itself, so the result is deterministic), then the
    two special tokens. Returns (vocab, ranked merges), the content of `vocab.json` / `merges.txt`."""
    import collections

    table = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for text in texts:
        for word in _PRETOKENIZE.findall(basic_cleanup(text)):
            symbols = [table[b] for b in word.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    base = list(table.values())
    vocab: dict[str, int] = {}
    for token in [*base, *(t + END_OF_WORD for t in base), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer_folder(folder: str | os.PathLike, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                           extra_files: dict[str, object] | None = None) -> pathlib.Path:
    """Writes `vocab.json` + `merges.txt` (+ JSON `extra_files`) that `CLIPTokenizer.from_folder` and
    transformers' `CLIPTokenizer` read."""
    from sketchcomp_jax.paths import as_path

    folder = as_path(folder)  # local or gs://
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    for name, content in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder
