"""Small CLIP and T5 tokenizers built in code, so that the random test pipelines need no download.

Real pipelines ship tokenizers trained on web text; the fixtures only need tokenizers of the same classes that
split typical training prompts ("a photo of sks dog", "a watercolor painting of a toy on the beach") into a
handful of ids and save and load like the real ones:

- `build_clip_tokenizer`: a `CLIPTokenizer` over a byte-level BPE vocabulary learned here from `WORDS`; any
  other text still tokenizes, byte by byte. Used by SD, SD-XL (twice) and FLUX.1 (its first encoder).
- `build_t5_tokenizer`: a `T5TokenizerFast` over a `tokenizers` Unigram model with one piece per word of
  `WORDS` plus single characters, laid out like T5's (`<pad>` 0, `</s>` 1, `<unk>` 2) and split, decoded and
  post-processed like the one transformers builds for T5, so that `save_pretrained` and `from_pretrained`
  round-trip. FLUX.1's second encoder.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

T5_PAD_TOKEN = "<pad>"
T5_EOS_TOKEN = "</s>"
T5_UNK_TOKEN = "<unk>"
T5_MAX_LENGTH = 512  # FLUX.1's max_sequence_length
METASPACE = "\u2581"  # SentencePiece's word-start marker

# Words that get their own single token. Any other text still tokenizes (CLIP: byte by byte; T5: character by
# character, unknown characters as <unk>).
WORDS = (
    "a an the photo photograph picture image of sks dog cat toy plush figure robot character "
    "in on at with and by from for to is wearing holding sitting standing running jumping swimming "
    "style painting drawing sketch watercolor oil pixel art anime cartoon realistic render portrait "
    "red blue green yellow orange purple pink white black brown gold silver "
    "small big cute happy little high quality detailed close up "
    "person man woman beach city snow forest park street garden kitchen room table grass "
    "background mountain river lake sky sunset night moon space astronaut hat car house tree "
    "water flowers bucket top"
).split()

# Unigram log-probabilities: a whole word always beats spelling it out, and a lone word-start marker plus
# characters is the fallback for everything else.
_T5_WORD_SCORE = -3.0
_T5_MARKER_SCORE = -4.0
_T5_CHARACTER_SCORE = -8.0
_T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation


# --------------------------------------------------------------------------- CLIP (byte-level BPE)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (GPT-2/CLIP) uses for bytes, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on ``words`` (each counted once) until every word is one symbol.

    Words are split into characters, the last one carrying the ``</w>`` suffix,
    as CLIP's tokenizer does. Ties between equally frequent pairs are broken
    lexicographically, so the result is deterministic.
    """
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_seqs = []
        for seq in seqs:
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new_seqs.append(tuple(out))
        seqs = new_seqs


def build_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: bytes, bytes + ``</w>``, merge results, then the two special tokens."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(list(WORDS))
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [CLIP_BOS_TOKEN, CLIP_EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_vocab_files(folder: Path) -> None:
    """Write ``vocab.json`` + ``merges.txt``, the files a file-based (transformers 4) ``CLIPTokenizer`` loads."""
    vocab, merges = build_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_clip_tokenizer(pad_token: str):
    """A ``CLIPTokenizer`` over the local vocabulary, padding with ``pad_token``.

    It is created from ``vocab.json`` + ``merges.txt`` in a temporary folder,
    which works both with transformers 4 (slow, file-based class) and
    transformers 5 (``tokenizers``-backed class).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab_files(Path(tmp))
        tok = CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=CLIP_MAX_LENGTH,
            bos_token=CLIP_BOS_TOKEN,
            eos_token=CLIP_EOS_TOKEN,
            unk_token=CLIP_EOS_TOKEN,
            pad_token=pad_token,
            local_files_only=True,
        )
    # transformers 5 records these loading arguments in init_kwargs; they are
    # about this temporary load, not about the tokenizer, so keep them out of
    # the saved tokenizer_config.json.
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        tok.init_kwargs.pop(key, None)
    return tok


# --------------------------------------------------------------------------- T5 (Unigram)


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) in id order: T5's three special tokens, the marker, words, characters."""
    pieces = [(T5_PAD_TOKEN, 0.0), (T5_EOS_TOKEN, 0.0), (T5_UNK_TOKEN, 0.0), (METASPACE, _T5_MARKER_SCORE)]
    pieces += [(METASPACE + word, _T5_WORD_SCORE) for word in dict.fromkeys(WORDS)]
    pieces += [(char, _T5_CHARACTER_SCORE) for char in _T5_CHARACTERS]
    return pieces


def build_t5_tokenizer():
    """A ``T5TokenizerFast`` (``model_max_length`` 512, no sentinel tokens) over the local Unigram model."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab = t5_vocab()
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    backend = Tokenizer(Unigram(vocab, unk_id=ids[T5_UNK_TOKEN], byte_fallback=False))
    # The same splitting, decoding and end-of-sequence template as transformers' own T5 tokenizer, which
    # rebuilds these from the vocabulary when it loads a saved folder: anything else would not round-trip.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS_TOKEN],
        pair=["$A", T5_EOS_TOKEN, "$B", T5_EOS_TOKEN],
        special_tokens=[(T5_EOS_TOKEN, ids[T5_EOS_TOKEN])],
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS_TOKEN,
        unk_token=T5_UNK_TOKEN,
        pad_token=T5_PAD_TOKEN,
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
