"""课程自建的极小模型：真实架构（Qwen2 / Llama / GLM）缩小到约 1-2M 参数，在本项目语料上短暂预训练。

做法参照 TRL 的 scripts/generate_tiny_models：拿真实架构的 config 类，把宽度和层数缩小，
初始化权重，再用项目自己的中英文语料训练一个字节级 BPE 分词器并预训练几百步，
这样模型不是纯随机的（会说"像样的"乱话、认得对话模板），冒烟测试里的训练效果才有意义。
同样的种子 + 同样的语料 => 同样的权重；结果缓存在 LLM_COURSE_CACHE（默认 ~/.cache/llm-course）。
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from common import data as cdata

TINY_NAMES = ("tiny-qwen2", "tiny-llama", "tiny-glm")
_VOCAB_SIZE = 3072          # 字节级 BPE：256 个字节打底，中文常用字/词靠合并得到
_SEQ_LEN = 128
_PRETRAIN_STEPS = 200       # 2 核 CPU 上约 10 秒/模型；足够学会对话模板和常见词
_BATCH = 8
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML 模板；{% generation %} 标出助手回复，apply_chat_template(return_assistant_tokens_mask=True)
# 与 TRL 的 assistant_only_loss 都靠它找出"哪些 token 计算损失"
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus_texts() -> list[str]:
    """预训练语料：通用 SFT 对话（按对话模板渲染）+ 领域文档 + 客服知识库。身份数据不放进来，
    这样第 1 课"身份问答准确率从 0 升上去"在极小模型上也成立。"""
    chats = [_render(conv) for name in ("sft/alpaca.jsonl", "sft/chat.jsonl", "domain/sft.jsonl")
             for conv in cdata.load_sft(cdata.DATA_DIR / name)]
    docs = [d.text for folder in ("domain/docs", "kb/docs") for d in cdata.load_documents(cdata.DATA_DIR / folder)]
    return chats + docs


def _render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _arch_config(name: str, vocab: int, ids: dict):
    from transformers import GlmConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # GLM-4 架构（ChatGLM 的后继，transformers 原生实现）：部分旋转位置编码、qkv 带 bias；head_dim 默认 128，跟着缩小
    cls, extra = {"tiny-qwen2": (Qwen2Config, {}), "tiny-llama": (LlamaConfig, {}),
                  "tiny-glm": (GlmConfig, {"head_dim": 32})}[name]
    return cls(**common, **extra)


def build_tokenizer(out_dir: Path) -> Path:
    """在项目语料上训练字节级 BPE 分词器并保存（三个极小模型共用）。"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus_texts(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = _CHAT_TEMPLATE
    tok.model_max_length = 1024
    tok.save_pretrained(out_dir)
    return out_dir


def corpus_hash() -> str:
    """语料 + 构建参数的指纹：数据或超参数一变，缓存自动失效。"""
    h = hashlib.sha256()
    for t in _corpus_texts():
        h.update(t.encode("utf-8"))
    h.update(json.dumps([_VOCAB_SIZE, _SEQ_LEN, _PRETRAIN_STEPS, _BATCH, _CHAT_TEMPLATE, 2]).encode())
    return h.hexdigest()[:12]


def build(name: str, out_dir: Path, tok_dir: Path, seed: int = 0, log=print) -> Path:
    """构建一个极小模型（配置 + 预训练）并保存到 out_dir；tok_dir 是 build_tokenizer 训练好的分词器。"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    texts = _corpus_texts()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = {s: tok.convert_tokens_to_ids(s) for s in _SPECIAL}
    config = _arch_config(name, len(tok), ids)
    model = AutoModelForCausalLM.from_config(config)

    # 预训练：所有文本拼成一条流，切成 _SEQ_LEN 的块，标准的下一个 token 预测
    stream: list[int] = []
    for t in texts:
        stream.extend(tok(t, add_special_tokens=False)["input_ids"] + [ids["<|endoftext|>"]])
    n = len(stream) // _SEQ_LEN
    blocks = torch.tensor(stream[: n * _SEQ_LEN]).view(n, _SEQ_LEN)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)  # 小网络容忍大学习率
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / _PRETRAIN_STEPS)))
    model.train()
    for _ in range(_PRETRAIN_STEPS):
        batch = blocks[torch.randint(0, n, (_BATCH,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                                               pad_token_id=ids["<|endoftext|>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {"name": name, "params": sum(p.numel() for p in model.parameters()), "tokens": len(stream),
            "final_pretrain_loss": round(loss.item(), 4), "build_seconds": round(time.perf_counter() - t0, 2)}
    (out_dir / "course_build.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"构建 {name}: {info['params'] / 1e6:.2f}M 参数，预训练 {_PRETRAIN_STEPS} 步，"
        f"loss {info['final_pretrain_loss']}，用时 {info['build_seconds']} 秒")
    return out_dir
