"""Offline CLIP tokenizers built from the CLIP BPE vocabulary that a package ships.

Stable Diffusion 1.x conditions on OpenAI CLIP ViT-L/14, SD 2.x and SDXL's second encoder on OpenCLIP; all of
them tokenize with the same byte-level BPE (`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens). The file ships
inside the `open-clip-torch` wheel, so a tokenizer can be rebuilt without any network access. SD 2.x's
tokenizer differs only in its padding token ("!", id 0, instead of "<|endoftext|>").
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from booth.errors import BoothError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
FULL_MERGES = 49152 - 256 - 2  # the merges CLIP uses: 48,894 (vocab 512 + 48,894 + 2 specials = 49,408)


def clip_bpe_path() -> Path:
    """Locate `bpe_simple_vocab_16e6.txt.gz` in an installed package, without importing the package."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
            if path.is_file():
                return path
    raise BoothError(
        "the CLIP BPE vocabulary was not found: install it with `pip install --no-deps open-clip-torch` "
        "(./install.sh does this)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (Radford et al. 2019)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=4)
def clip_vocab_and_merges(num_merges: int = FULL_MERGES) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge list, optionally truncated to the first `num_merges`.

    A truncated vocabulary still tokenizes every string (BPE falls back to shorter pieces); tiny test models
    use one to keep their embedding tables small.
    """
    if not 0 <= num_merges <= FULL_MERGES:
        raise BoothError(f"num_merges must be in [0, {FULL_MERGES}], got {num_merges}")
    with gzip.open(clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : num_merges + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(
    folder: str | Path, num_merges: int = FULL_MERGES, pad_token: str = EOS, model_max_length: int = 77
) -> Path:
    """Write a diffusers/transformers `tokenizer/` folder (vocab.json, merges.txt, configs) for CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(num_merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_clip_tokenizer(num_merges: int = FULL_MERGES, pad_token: str = EOS, model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` built offline (see module docstring)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp, num_merges, pad_token, model_max_length)
        return CLIPTokenizer.from_pretrained(tmp)
