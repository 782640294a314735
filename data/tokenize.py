"""WordPiece tokenisation with the ``tokenizers`` library, from a model directory's vocab.txt,
and a disk cache so that each data file is tokenised once."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from tokenizers import BertWordPieceTokenizer

from data.atomic import atomic_write
from data.files import Example


@dataclass
class EncodedSplit:
    """A tokenised split. ``views`` holds one list of sequences per encoder input: one view for
    single sentences and cross-encoded pairs, two views (sentence 1, sentence 2) for bi-encoding.
    Each sequence is ``(input_ids, token_type_ids)``, unpadded."""

    ids: list[str]
    views: list[list[tuple[list[int], list[int]]]]
    labels: list[float | int] | None

    def __len__(self) -> int:
        return len(self.ids)


class Tokenizer:
    """BERT WordPiece tokeniser. Lower-cases when the model's tokenizer_config.json says so
    (``do_lower_case``, true by default as for bert-base-uncased)."""

    def __init__(self, model_dir: str | Path, max_length: int = 128):
        model_dir = Path(model_dir)
        vocab = model_dir / "vocab.txt"
        if not vocab.is_file():
            raise FileNotFoundError(f"{model_dir}: no vocab.txt; a Hugging Face BERT directory has one")
        lowercase = True
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            lowercase = bool(json.loads(config_file.read_text()).get("do_lower_case", True))
        self.max_length = max_length
        self.lowercase = lowercase
        self.vocab_digest = hashlib.sha1(vocab.read_bytes()).hexdigest()[:16]
        self.backend = BertWordPieceTokenizer(str(vocab), lowercase=lowercase)
        self.backend.enable_truncation(max_length=max_length, strategy="longest_first")
        self.pad_id = self.backend.token_to_id("[PAD]")

    def encode(self, first: list[str], second: list[str] | None = None) -> list[tuple[list[int], list[int]]]:
        """Single sentences, or pairs as ``[CLS] a [SEP] b [SEP]`` with segment ids 0/1."""
        inputs = list(first) if second is None else list(zip(first, second, strict=True))
        return [(e.ids, e.type_ids) for e in self.backend.encode_batch(inputs)]

    def encode_examples(self, examples: list[Example], pair_encoding: str = "cross") -> EncodedSplit:
        """``pair_encoding`` is "cross" (one joint sequence) or "bi" (each sentence alone)."""
        columns = list(zip(*(e.texts for e in examples), strict=True))
        if len(columns) == 1 or pair_encoding == "bi":
            views = [self.encode(list(col)) for col in columns]
        elif pair_encoding == "cross":
            views = [self.encode(list(columns[0]), list(columns[1]))]
        else:
            raise ValueError(f"pair_encoding must be 'cross' or 'bi', not {pair_encoding!r}")
        labels = None if examples[0].label is None else [e.label for e in examples]
        return EncodedSplit([e.id for e in examples], views, labels)


def swap_pair_order(split: EncodedSplit) -> EncodedSplit:
    """A cross-encoded split with each pair's sentences in the other order: "[CLS] a [SEP] b [SEP]"
    (segment ids 0 then 1) becomes "[CLS] b [SEP] a [SEP]". Swapped token by token, so each sentence
    keeps the tokens it had (truncated as before) and the split needs no second tokenisation."""
    if len(split.views) != 1:
        raise ValueError(f"only a cross-encoded split (one view) has a pair order to swap; this one has {len(split.views)} views")
    swapped = []
    for ids, types in split.views[0]:
        first = types.count(0)  # [CLS] a [SEP]
        if first == len(types) or types[first:] != [1] * (len(types) - first):
            raise ValueError("a sequence without a second segment (token type 1) is not a cross-encoded pair")
        a, b = ids[1 : first - 1], ids[first:-1]
        swapped.append(([ids[0], *b, ids[first - 1], *a, ids[-1]], [0] * (len(b) + 2) + [1] * (len(a) + 1)))
    return EncodedSplit(split.ids, [swapped], split.labels)


def cached_encode(
    tokenizer: Tokenizer,
    source: Path,
    examples: list[Example],
    pair_encoding: str,
    cache_dir: str | Path | None,
) -> EncodedSplit:
    """Tokenise ``examples`` read from ``source``, reusing a cache keyed by the file's bytes,
    the vocabulary and the settings. The cache is written atomically (temp file, then rename)."""
    if cache_dir is None:
        return tokenizer.encode_examples(examples, pair_encoding)
    key = hashlib.sha1(Path(source).read_bytes()).hexdigest()[:16]
    settings = f"{tokenizer.vocab_digest}-{int(tokenizer.lowercase)}-{tokenizer.max_length}-{pair_encoding}"
    name = f"{Path(source).stem}-{key}-{settings}.pkl"
    cache_file = Path(cache_dir) / name
    if cache_file.is_file():
        try:
            with open(cache_file, "rb") as fp:
                encoded = pickle.load(fp)
            if isinstance(encoded, EncodedSplit) and len(encoded) == len(examples):
                return encoded
        except Exception:  # a corrupt cache entry is rebuilt below
            pass
    encoded = tokenizer.encode_examples(examples, pair_encoding)

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as fp:
            pickle.dump(encoded, fp, protocol=pickle.HIGHEST_PROTOCOL)

    atomic_write(cache_file, dump)
    return encoded
