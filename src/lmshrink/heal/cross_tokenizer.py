"""Distillation from a teacher with another tokenizer: the same text in each model's tokens, and
the positions where both have read exactly the same text.

Each training block (the student's tokens) is cut at its special tokens (the EOS between packed
documents, a start token) into pieces of plain text, each decoded and encoded again by both
tokenizers with their character offsets; the teacher gets each piece in its own framing (its start
tokens before a block, its EOS where the student's was). Student position i and teacher position j
are aligned when their tokens end at the same character of the same piece: both have then read the
same text, so their next-token distributions predict the same thing, over different vocabularies
(ULD's sorted-probability distance compares them, `losses.universal_logit_distance`). A character
where either tokenizer ends two tokens (an offset it trims) is not aligned, nor is a piece whose
text the student's tokenizer does not encode back to the block's own tokens (a cut through a
multi-byte character).

Alignment needs fast (Rust) tokenizers, which report offsets: every model family lmshrink supports
ships one; a slow-only tokenizer is refused.
"""

from __future__ import annotations

from typing import Any

from lmshrink.config import SettingsError
from lmshrink.data.sources import Framing

NO_POSITION = -1  # pads the alignment columns


def check_alignable(student_tokenizer, teacher_tokenizer) -> None:
    """Refuse a pair the alignment cannot work with (one line naming what is missing)."""
    for name, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise SettingsError(f"the {name}'s tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, so it "
                                "reports no character offsets to align the two models' tokens by; give a model whose "
                                "folder has a tokenizer.json")


def _ends(tokenizer, text: str) -> tuple[list[int], dict[int, int]]:
    """The text's tokens, and {character a token ends at: its index} for characters only one token ends at."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends: dict[int, int] = {}
    doubled = set()
    for index, (_, end) in enumerate(encoded["offset_mapping"]):
        if end in ends:
            doubled.add(end)
        ends[end] = index
    return list(encoded["input_ids"]), {e: i for e, i in ends.items() if e not in doubled and e > 0}


def pair_block(ids: list[int], student_tokenizer, teacher_tokenizer, teacher_length: int) -> dict[str, list[int]]:
    """One student block as the teacher reads it (`teacher_ids`, `teacher_length` tokens, padded),
    and the aligned positions (`align_student`, `align_teacher`, as long as the block, padded with -1)."""
    specials = set(student_tokenizer.all_special_ids)
    framing = Framing.of(teacher_tokenizer)
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else (framing.eos or 0)
    teacher, pairs = list(framing.start), []
    start = 0
    for end in [*(i for i, t in enumerate(ids) if t in specials), len(ids)]:
        piece = ids[start:end]
        if piece:
            text = student_tokenizer.decode(piece)
            again, student_ends = _ends(student_tokenizer, text)
            teacher_piece, teacher_ends = _ends(teacher_tokenizer, text)
            if again == piece:  # else the piece's text does not encode back to its tokens: not aligned
                pairs += [(start + student_ends[c], len(teacher) + teacher_ends[c])
                          for c in sorted(student_ends.keys() & teacher_ends.keys())]
            teacher += teacher_piece
        if end < len(ids):  # the student's special token: the teacher's EOS, or its start tokens
            token = ids[end]
            teacher += ([framing.eos] if token == student_tokenizer.eos_token_id and framing.eos is not None
                        else list(framing.start))
        start = end + 1
    pairs = [(s, t) for s, t in pairs if t < teacher_length]
    teacher = (teacher + [pad] * teacher_length)[:teacher_length]
    fill = [NO_POSITION] * (len(ids) - len(pairs))
    return {"teacher_ids": teacher, "align_student": [s for s, _ in pairs] + fill,
            "align_teacher": [t for _, t in pairs] + fill}


def pair_with_teacher(blocks: Any, student_tokenizer, teacher_tokenizer, block_size: int,
                      num_proc: int | None = None) -> Any:
    """The training blocks with the teacher's tokens and the aligned positions added (a `datasets`
    map, cached like the packing). The teacher's rows are 2 x block_size long: room for a tokenizer
    that splits text into up to twice as many tokens (alignments past it are dropped)."""
    check_alignable(student_tokenizer, teacher_tokenizer)

    def add(batch: dict[str, list]) -> dict[str, list]:
        rows = [pair_block(list(ids), student_tokenizer, teacher_tokenizer, 2 * block_size)
                for ids in batch["input_ids"]]
        return {key: [row[key] for row in rows] for key in ("teacher_ids", "align_student", "align_teacher")}

    kwargs = {"desc": "aligning the teacher's tokens"} if hasattr(blocks, "num_rows") else {}
    if num_proc and hasattr(blocks, "num_rows"):
        kwargs["num_proc"] = num_proc
    return blocks.map(add, batched=True, **kwargs)


def aligned_share(blocks: Any, rows: int = 64) -> float:
    """The share of the first `rows` blocks' positions aligned with a teacher position."""
    total = aligned = 0
    for index, row in enumerate(blocks):
        if index >= rows:
            break
        positions = list(row["align_student"])
        total += len(positions)
        aligned += sum(int(p) != NO_POSITION for p in positions)
    return aligned / max(1, total)
