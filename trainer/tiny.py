"""Models that can be built here, with no model hub.

`build_tiny` makes a Llama-shaped model small enough to train in seconds on a CPU, with a real
byte-level BPE tokenizer and a chat template, so tests and the embedded demo exercise the same
code paths as a hub model. `build_config` gives full-size shapes for benchmarks: speed and memory
depend on the shape, not on the weight values, so random weights are enough.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig

from trainer.data.tokenize import TOOL_CALLS_JINJA

ASSETS = Path(__file__).parent / "assets"
CORPUS = ASSETS / "tiny_corpus.txt"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TINY_VOCAB = 768

# One header token per role; EOS closes every assistant turn so the model learns to stop.
# The newline after EOS is layout only; data.py leaves trailing whitespace out of the loss.
# Tools as OpenAI sends them: the line's function definitions in a system block first, an
# assistant's calls as <tool_call>{"name", "arguments"}</tool_call> inside its turn, a tool's
# answer as a turn of its own; developer is the system role.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\nTools:' }}"
    "{% for tool in tools %}{{ '\n' + tool['function'] | tojson }}{% endfor %}{{ '\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('role must be system, developer, user, assistant or tool, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + ('system' if message['role'] == 'developer' else message['role']) + '|>\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    + TOOL_CALLS_JINJA +
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# name -> (hidden, layers, heads, kv_heads, ffn, vocab, tied, rope_theta)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool, float]] = {
    # Qwen2.5-0.5B's dimensions in a Llama block (no qkv bias): ~0.49B parameters.
    "llama-0.5b": (896, 24, 14, 2, 4864, 151_936, True, 1_000_000.0),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128_256, True, 500_000.0),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128_256, True, 500_000.0),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128_256, False, 500_000.0),
}


def build_config(shape: str) -> LlamaConfig:
    """A full-size Llama config by name (see SHAPES), for benchmarks with random weights."""
    if shape not in SHAPES:
        raise ValueError(f"shape: {shape!r} is unknown; choose one of {', '.join(SHAPES)}")
    hidden, layers, heads, kv, ffn, vocab, tied, theta = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tokenizer():
    """Byte-level BPE trained on the shipped corpus; training is deterministic for fixed input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        # Every byte is in the vocabulary, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


PRETRAIN_STEPS = 150


def pretrain_on_corpus(model, tokenizer, steps: int, seq_len: int = 64, batch_size: int = 8) -> float:
    """A few hundred steps of language modelling on the shipped corpus; returns the last loss.

    A randomly initialised model with tied embeddings of std 0.02 can only produce logits of
    about +-1, so a frozen base cannot express a sharp answer and LoRA on it barely learns.
    Like any real base model, the tiny one must have been trained on text first. Seeded by the
    caller's RNG state, so the weights stay a pure function of the seed.
    """
    import torch

    ids = torch.tensor(tokenizer(CORPUS.read_text(encoding="utf-8"))["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,))
        batch = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def build_tiny(out_dir: str | Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS) -> Path:
    """Save a tiny Llama-shaped model, its tokenizer and chat template into out_dir (pretrain_steps
    0: random weights, at once, for benches that only need the model to be there)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private generator keeps the caller's global RNG untouched and the weights a pure
    # function of the seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if pretrain_steps:
            pretrain_on_corpus(model, tokenizer, pretrain_steps)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_shape(out_dir: str | Path, shape: str, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Save a full-size shape with random weights and the tiny tokenizer (ids fit any vocab)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out
