"""给序列打分的公共原语：回答 token 的 log π 与熵、奖励模型（打分头）在最后一个真实 token / 每个位置上的分数。

对齐（奖励模型、PPO、DPO）与评估都要在同一批 (input_ids, attention_mask) 上量这些数；左填充时位置必须
从第一个真实 token 起算，否则同一句话换个填充长度输出就变了。
"""
from __future__ import annotations


def positions(mask):
    """左填充批次的 position_ids：每行从第一个真实 token 起 0, 1, 2, ..."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _base(model):
    """LoRA 包装（PeftModel）-> 里面注入了 adapter 的 transformers 模型；普通模型原样返回。"""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hidden(model, ids, mask):
    """序列分类模型的主干隐状态（不经过打分头）。"""
    model = _base(model)
    return getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=positions(mask))[0]


def last_token_scores(rm, ids, mask):
    """奖励模型：主干隐状态 -> 最后一个真实 token -> score 头 = 每条序列一个标量。"""
    import torch

    h = _hidden(rm, ids, mask)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return _base(rm).score(h[torch.arange(len(ids)), last]).squeeze(-1).float()


def token_scores(model, ids, mask):
    """同一个打分头作用在每个位置上（PPO 的 critic：每个前缀的价值 V）。"""
    return _base(model).score(_hidden(model, ids, mask)).squeeze(-1).float()


def response_logprobs(model, ids, mask, start: int):
    """从位置 start 起（回答部分）每个 token 的 log π 与分布的熵：位置 t 的 logits 预测 t+1 的 token。"""
    import torch

    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, start - 1:-1].float()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, start:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)
