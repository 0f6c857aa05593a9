"""The bundled model's tokenizer files: its byte vocabulary as a Hugging Face ``tokenizer.json``.

The bundled model reads bytes (id = byte value) and one file-boundary id, 256
(:mod:`moepass.bundled.corpus`).  Written as a byte-level BPE with no merges, whose
vocabulary maps each byte's printable stand-in character to the byte's value,
the same ids come out of transformers (``PreTrainedTokenizerFast``), the
``tokenizers`` library and onnxruntime-genai's ``og.Tokenizer``, so a folder
exported with :func:`moepass.export_genai` encodes and decodes text itself::

    python -m moepass.bundled.train.tokenizer        # writes moepass/bundled/data/tokenizer.json, tokenizer_config.json
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["BOUNDARY_TOKEN", "byte_characters", "tokenizer_files", "write_tokenizer"]

#: The text of the file-boundary token (id 256, also the model's EOS and BOS).
BOUNDARY_TOKEN = "<|file|>"


logger = logging.getLogger(__name__)

def byte_characters() -> dict[int, str]:
    """Byte value → the printable character byte-level tokenizers stand it in for.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space,
    soft hyphen, ...) take the characters from U+0100 on, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    characters, spare = {}, 0
    for value in range(256):
        if value in printable:
            characters[value] = chr(value)
        else:
            characters[value] = chr(0x100 + spare)
            spare += 1
    return characters


def tokenizer_files(context_length: int = 1024) -> dict[str, dict]:
    """The contents of ``tokenizer.json`` and ``tokenizer_config.json``."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 256, "content": BOUNDARY_TOKEN, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {character: value for value, character in byte_characters().items()}, "merges": []},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOUNDARY_TOKEN,
        "eos_token": BOUNDARY_TOKEN,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write_tokenizer(folder: str | Path) -> list[Path]:
    """Write the tokenizer files into ``folder``; returns their paths."""
    folder = Path(folder)
    written = []
    for name, content in tokenizer_files().items():
        path = folder / name
        path.write_text(json.dumps(content, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    from moepass.bundled import BUNDLED_DIR

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_tokenizer(BUNDLED_DIR):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
