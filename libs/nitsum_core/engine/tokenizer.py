"""Tokenisation, chat templates and incremental detokenisation (router side)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from nitsum_core.wire.client import ChatMessage


class Tokenizer:
    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.path = Path(checkpoint_dir)
        self.hf = AutoTokenizer.from_pretrained(str(self.path))
        self.eos_token_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.hf.eos_token_id is not None:
            ids.add(int(self.hf.eos_token_id))
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(e) for e in eos)
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.hf.encode(prompt, add_special_tokens=True))

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        text = self.hf.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes a short window (prefix offset .. end) and emits only the new suffix, holding back text
    that ends in an incomplete UTF-8 sequence (the replacement character) until it is complete.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""
