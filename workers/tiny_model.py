"""``python -m workers tiny-model --out DIR --size small|frontier``: build a tiny Llama model that
real vLLM can serve, with no model hub.

Its weights are RANDOM and its text is noise. It exists so that the real engine — scheduler, KV
cache, tokenizer, OpenAI server, metrics — runs on a machine without a GPU or hub access: in the
quickstart (``gateway up``) and in the end-to-end tests. To serve a real model, point the tier's
worker profile at a model id or a local checkpoint instead (see ``policies/local.workers.yaml``).

The build is deterministic: the same size gives the same tokenizer and the same weights, byte for
byte. The tokenizer is a byte-level BPE trained with ``tokenizers`` on text generated here (so any
input can be encoded), saved with a chat template so ``/v1/chat/completions`` works. The two sizes
differ in width, depth and context so that the tiers differ: CPU attention needs a head size of
64 (16 is refused).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 4096},
    "frontier": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "max_position_embeddings": 32768,
    },
}
HEAD_DIM = 64
VOCAB_SIZE = 512
SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% else %}{{ message['role'] + ': ' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
MARKER = "tiny-model.json"

_VOCABULARY = (
    "the a an of to in for on with by from as at and or but not is are was be this that these those it "
    "model gateway request token tier route policy ledger worker cost price budget limit article summary "
    "category title keyword news sport business science health culture travel market report story write "
    "classify summarize translate answer question explain list describe compare short long fast slow "
    "hello world please thank you yes no one two three four five six seven eight nine ten"
)


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic training text: word salad plus every printable ASCII character and digits."""
    rng = random.Random(seed)
    words = _VOCABULARY.split()
    out = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(lines)]
    out.append("".join(chr(c) for c in range(32, 127)))
    out.extend(str(rng.randint(0, 10**6)) for _ in range(200))
    return out


def build(out: Path, size: str) -> Path:
    """Write the model to ``out`` (created); return it. Needs torch, transformers and tokenizers
    (the ``cpu-worker`` extra)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            f"tiny-model needs torch, transformers and tokenizers: pip install -e '.[cpu-worker]' ({exc})"
        ) from None

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=SIZES[size]["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))

    dims = SIZES[size]
    heads = dims["hidden_size"] // HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=dims["max_position_embeddings"],
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(str(out), safe_serialization=True)
    info: dict[str, Any] = {"size": size, **dims, "vocab_size": config.vocab_size, "weights": "random"}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return out


def is_built(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workers tiny-model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR already holds a tiny model")
    args = ap.parse_args(argv)
    if is_built(args.out) and not args.force:
        print(f"{args.out}: already built (use --force to rebuild)", file=sys.stderr)
        return
    build(args.out, args.size)
    print(f"{args.out}: tiny {args.size} model built (random weights: its text is noise)", file=sys.stderr)


if __name__ == "__main__":
    main()
