"""umT5 tokenizer: HF `tokenizers` loading a local `tokenizer.json` (google/umt5-xxl ships one).

T5 conventions, as Wan2.1 / diffusers tokenize prompts (`padding="max_length"`,
`truncation=True`, `add_special_tokens=True`): every prompt is cleaned (HTML
unescaped, whitespace collapsed), tokenized, truncated to `max_len - 1` tokens, ended
with `</s>` (id 1) and right-padded with `<pad>` (id 0); the mask marks prompt + `</s>`.
(Wan also runs `ftfy.fix_text`, which only changes mis-encoded text; it is not used here.)
"""

from __future__ import annotations

import html
import os
import re

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (without ftfy): HTML-unescape twice, collapse whitespace, strip."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5Tokenizer:
    """`encode(prompts, max_len) -> (ids [B, max_len] int32, mask [B, max_len] int32)`.

    Args:
      path: a `tokenizer.json`, or a directory holding one (e.g. a diffusers pipeline's
        `tokenizer/`).
      clean: apply `clean_prompt` before tokenizing (as Wan and diffusers do).
    """

    def __init__(self, path: str, clean: bool = True):
        fn = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(fn):
            raise FileNotFoundError(
                f"tokenizer file {fn!r} does not exist (give a tokenizer.json or a directory holding one, "
                f"e.g. google/umt5-xxl's)"
            )
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(fn)
        except Exception as e:
            raise ValueError(f"cannot read tokenizer file {fn!r}: {e}") from e
        self.path, self.clean = fn, clean
        ids = {name: self.tok.token_to_id(name) for name in ("<pad>", "</s>")}
        absent = [k for k, v in ids.items() if v is None]
        if absent:
            raise ValueError(f"tokenizer {fn!r} has no {absent} token(s): not a T5 tokenizer")
        self.pad_id, self.eos_id = ids["<pad>"], ids["</s>"]
        # We add </s> and padding ourselves; the file's own post-processing and padding are bypassed.
        self.tok.no_padding()
        self.tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, without `</s>` or padding."""
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, prompts, max_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """`prompts` (str or list) -> `(ids [B, max_len] int32, mask [B, max_len] int32)`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = np.full((len(prompts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), max_len), np.int32)
        for r, toks in enumerate(self.tokenize(list(prompts))):
            toks = list(toks[: max_len - 1]) + [self.eos_id]
            ids[r, : len(toks)] = toks
            mask[r, : len(toks)] = 1
        return ids, mask
