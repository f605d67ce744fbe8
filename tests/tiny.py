"""Tiny randomly initialised models of every supported architecture, built in-process."""
from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 64}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    # Random init gives tiny weights; widen them so activations are not all near zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def random_tokens(n: int, seq_len: int, seed: int = 1, vocab: int = COMMON["vocab_size"]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def tiny_tokenizer(shift: int = 0):
    """A word-level tokenizer over the words w0..w126 (id 127 is [UNK]), built offline; word wi
    has id (i + shift) mod 127."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": (i + shift) % (COMMON["vocab_size"] - 1) for i in range(COMMON["vocab_size"] - 1)}
    vocab["[UNK]"] = COMMON["vocab_size"] - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w0")


def random_text(words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, COMMON["vocab_size"] - 1, (words,), generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())


CALIB = random_tokens(8, 48, seed=3)
EVAL = random_tokens(4, 48, seed=4)


def logits(model, tokens: torch.Tensor = EVAL) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def measured(model, tokens: torch.Tensor = EVAL):
    """The sparsity report of one forward pass over `tokens`."""
    from actsparse.measure import measure_sparsity

    with measure_sparsity(model) as meter, torch.no_grad():
        model(tokens)
    return meter.report()


def saved_tiny_llama(path):
    """A tiny Llama and its tokenizer saved as a Hugging Face directory, for the command line."""
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
