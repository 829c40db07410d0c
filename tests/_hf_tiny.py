"""Tiny Hugging Face models, a tokenizer and instruction data for CPU tests (built here, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qgl._hf import transformers

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = ["what", "is", "the", "color", "of", "sky", "grass", "sun", "snow", "night", "blue", "green",
         "yellow", "white", "black", "tell", "me", "a", "fact", "about", "cats", "dogs", "birds",
         "fish", "they", "can", "fly", "swim", "run", "bark", "meow", "sing", "hello", "hi", "how",
         "are", "you", "fine", "thanks"]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

PAIRS = [("what is the color of sky", "blue"), ("what is the color of grass", "green"),
         ("what is the color of sun", "yellow"), ("what is the color of snow", "white"),
         ("what is the color of night", "black"), ("tell me a fact about cats", "they meow"),
         ("tell me a fact about dogs", "they bark"), ("tell me a fact about birds", "they can fly and sing"),
         ("tell me a fact about fish", "they can swim"), ("hello how are you", "fine thanks")]


def tiny_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `WORDS` with eos `</s>` and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers().PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                  bos_token="<s>", eos_token="</s>",
                                                  additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, **kw):
    tf = transformers()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=3, bos_token_id=2, pad_token_id=1, **kw)
    return tf.LlamaForCausalLM(cfg)


def tiny_llama_dir(root: Path, seed: int = 0) -> Path:
    """A random tiny LlamaForCausalLM (GQA: 4 heads, 2 kv heads) and `tiny_tokenizer` saved in `root`."""
    tok = tiny_tokenizer()
    tiny_llama(len(tok), seed).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def tiny_gpt2(vocab_size: int = 64, seed: int = 0):
    tf = transformers()
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()  # eval: no dropout, so that logits compare


def instruction_jsonl(path: Path, repeat: int = 4, chat: bool = True) -> Path:
    """`PAIRS` as {"prompt","response"} lines, and (chat) as {"messages"} lines, `repeat` times."""
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for p, r in PAIRS:
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
                if chat:
                    f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": r}]}) + "\n")
    return path
