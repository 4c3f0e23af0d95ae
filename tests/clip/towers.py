"""Tiny open_clip configs of every text tower kind, written offline: model config JSON files, two local Hugging Face
tokenizers (byte-level BPE like RoBERTa's, word-level like SigLIP's T5 one, both built here from a word list) and
two 1-layer Hugging Face text configs (RoBERTa, BERT). Width 32, 1-2 layers: random weights come from open_clip."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a photo of the small large dog cat bird fish shirt bag boot dress tree frog goldfish shark rain "
         "in on with blurry bad art origami video game itap").split()
# the BPE trainer needs running text: every rotation of the word list, and the context placeholders
CORPUS = ([" ".join(WORDS[i:] + WORDS[:i]) + " ." for i in range(len(WORDS))] + ["X X X X x x x x ."]) * 20

VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

# name -> what it stands for in open_clip's zoo
KINDS = {
    "pk-causal": "causal, argmax pooling, plain CLIP class (OpenAI CLIP, LAION ViT/RN)",
    "pk-causal-custom": "causal, argmax pooling, CustomTextCLIP (EVA, DFN)",
    "pk-eos": "causal, eos-id pooling (MetaCLIP 2 worldwide)",
    "pk-siglip": "bidirectional, last-token pooling, no padding mask, T5-style tokenizer (SigLIP)",
    "pk-siglip2": "SigLIP with tanh GELU (SigLIP2)",
    "pk-bidirectional": "bidirectional, argmax pooling, no padding mask (MobileCLIP2)",
    "pk-coca": "causal + appended class token + padding mask (CoCa)",
    "pk-roberta": "Hugging Face RoBERTa tower, mean pooling, BPE tokenizer (roberta-ViT-B-32)",
    "pk-bert": "Hugging Face BERT tower, CLS pooler output, MLP projection (nllb-clip style)",
}


def bpe_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer with RoBERTa's special tokens and template (<s> ... </s>, padding id 1)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(folder)
    return folder


def word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer like SigLIP's T5 one: no start token, </s> at the end, padding id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, ".": 3, "x": 4, "X": 5}
    vocab.update({word: i + len(vocab) for i, word in enumerate(sorted(set(WORDS)))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def hf_text_config(folder: Path, kind: str, vocab_size: int, pad_id: int) -> Path:
    """A 1-layer Hugging Face text config (open_clip builds the model from it, with random weights)."""
    from transformers import BertConfig, RobertaConfig

    config_cls = {"roberta": RobertaConfig, "bert": BertConfig}[kind]
    config_cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=40, pad_token_id=pad_id,
               type_vocab_size=1).save_pretrained(folder)
    return folder


def write_configs(folder: Path) -> dict[str, Path]:
    """Config files of every kind in ``KINDS`` under ``folder``, their tokenizers and HF configs beside them."""
    bpe = bpe_tokenizer(folder / "bpe")
    words = word_tokenizer(folder / "words")
    roberta = hf_text_config(folder / "roberta", "roberta", 400, 1)
    bert = hf_text_config(folder / "bert", "bert", 400, 1)
    siglip_text = {**TEXT, "vocab_size": 64, "hf_tokenizer_name": str(words), "no_causal_mask": True,
                   "proj_bias": True, "pool_type": "last", "tokenizer_kwargs": {"clean": "canonicalize"},
                   "norm_kwargs": {"eps": 1e-6}}
    coca_vision = {**VISION, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True}
    hf_text = {"hf_tokenizer_name": str(bpe), "context_length": 16}
    specs = {
        "pk-causal": {"embed_dim": 32, "vision_cfg": VISION, "text_cfg": TEXT},
        "pk-causal-custom": {"embed_dim": 32, "custom_text": True, "vision_cfg": VISION, "text_cfg": TEXT},
        "pk-eos": {"embed_dim": 32, "vision_cfg": VISION,
                   "text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 49407}},
        "pk-siglip": {"embed_dim": 32, "custom_text": True, "init_logit_bias": -10, "vision_cfg": VISION,
                      "text_cfg": siglip_text},
        "pk-siglip2": {"embed_dim": 32, "custom_text": True, "init_logit_bias": -10, "vision_cfg": VISION,
                       "text_cfg": {**siglip_text, "act_kwargs": {"approximate": "tanh"}}},
        "pk-bidirectional": {"embed_dim": 32, "custom_text": True, "vision_cfg": VISION,
                             "text_cfg": {**TEXT, "no_causal_mask": True}},
        "pk-coca": {"embed_dim": 32, "custom_text": True, "vision_cfg": coca_vision,
                    "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
                    "multimodal_cfg": {**TEXT, "layers": 1, "attn_pooler_heads": 2}},
        "pk-roberta": {"embed_dim": 32, "vision_cfg": VISION,
                       "text_cfg": {**hf_text, "hf_model_name": str(roberta), "hf_pooler_type": "mean_pooler",
                                    "hf_proj_type": "linear"}},
        "pk-bert": {"embed_dim": 32, "vision_cfg": VISION,
                    "text_cfg": {**hf_text, "hf_model_name": str(bert), "hf_pooler_type": "cls_pooler",
                                 "hf_proj_type": "mlp"}},
    }
    paths = {}
    for name, config in specs.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(config))
    return paths
