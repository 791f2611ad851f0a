"""A small Llama-architecture model built here from a config, with a byte-level BPE tokenizer
trained on the text it will learn: the starting point of the built-in language-model pipeline
(and of the tests), saved with `save_pretrained` so that everything downstream takes the same
`from_pretrained` path as a user's Llama or Qwen checkpoint. No hub is needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import Field, model_validator

from hamu_ray.schema import Section

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


class SmallLlama(Section):
    """The shape of the model (defaults: ≈0.26M parameters with a 2048-token vocabulary)."""
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int | None = Field(None, gt=0)  # None: as many as heads
    vocab_size: int = Field(2048, gt=len(SPECIAL_TOKENS))  # the tokenizer's target; text may give fewer
    max_positions: int = Field(256, gt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "SmallLlama":
        kv = self.kv_heads or self.heads
        if self.hidden_size % self.heads or self.heads % kv:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by heads {self.heads}, "
                             f"and heads by kv_heads {kv}")
        return self


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (any text tokenises, none becomes <unk>); every sequence starts with <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build(directory: str | Path, shape: SmallLlama, texts: Iterable[str], *,
          chat_template: str | None = None) -> Path:
    """A randomly initialised Llama (seeded) and its tokenizer, saved to `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = train_tokenizer(texts, shape.vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads or shape.heads,
                         max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
