"""Tiny random checkpoints laid out like the hub's: for tests, demos and CI (no download needed).

`build_tiny_base` writes an HF folder (config, safetensors, a byte-level BPE tokenizer with
`<|MASK|>` and a chat template); `build_random_adapter` writes a PEFT LoRA adapter for it with
random, non-zero A and B, made by `peft` itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

MASK_TOKEN = "<|MASK|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", MASK_TOKEN]
BOS_TOKEN = "<s>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged key-value cache stores attention keys in
fixed-size pages. Speculative decoding drafts several tokens and verifies them in one forward pass.
def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i * i)\n
One, two, three, four, five, six, seven, eight, nine, ten. Water boils at 100 degrees Celsius.
Explain why the sky is blue. Convert 5 kilometres to miles. Write a haiku about autumn leaves.
"""


def build_tokenizer(vocab_size: int = 384, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template; `add_bos`: Llama style, it puts `<s>`
    before every encoded text, and the chat template starts with it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [BOS_TOKEN] * add_bos,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    if add_bos:
        bos = (BOS_TOKEN, tok.token_to_id(BOS_TOKEN))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=BOS_TOKEN if add_bos else None,
        chat_template="{{ bos_token }}" * add_bos + CHAT_TEMPLATE,
    )


def build_tiny_base(
    out: Path,
    *,
    model_type: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
    init_std: float = 0.1,
    add_bos: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random tiny base model (Qwen3 or Llama) with its tokenizer to `out`.

    `vocab_size` larger than the tokenizer pads the embedding table (as Qwen3-8B's is padded);
    `add_bos` gives it a Llama-style tokenizer that adds BOS.
    """
    out = Path(out)
    tokenizer = build_tokenizer(add_bos=add_bos)
    config_cls = transformers.Qwen3Config if model_type == "qwen3" else transformers.LlamaConfig
    config = config_cls(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model_cls = (
        transformers.Qwen3ForCausalLM if model_type == "qwen3" else transformers.LlamaForCausalLM
    )
    model = model_cls(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def repetitive_corpus(num_docs: int = 400, seed: int = 0) -> list[str]:
    """Short, highly predictable documents (rotated counting), for a base that is easy to draft."""
    import random

    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    docs = []
    for _ in range(num_docs):
        k = rng.randrange(len(words))
        docs.append(" ".join(words[k:] + words[:k]) + ", " + " ".join(words[k:]) + ".")
    return docs


def fit_tiny_base(
    path: Path, texts: list[str], *, steps: int = 300, lr: float = 3e-3, seed: int = 0
):
    """Train the tiny base at `path` in place on `texts` (plain next-token loss), so that its
    greedy continuations have structure an adapter can learn to draft."""
    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = tok.eos_token_id
    stream = [t for text in texts for t in [*tok.encode(text, add_special_tokens=False), eos]]
    seq = 64
    data = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return path


def build_random_adapter(
    out: Path,
    base: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: list[str] | str = "all-linear",
    std: float = 0.2,
    seed: int = 0,
    **lora_kwargs,
) -> Path:
    """Write a PEFT LoRA adapter for `base` whose A and B are random and non-zero."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("lora_", "trainable_tokens", "modules_to_save")):
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return Path(out)
