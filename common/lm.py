"""语言模型上的几种"量一量"：逐 token 对数概率、困惑度、右填充成批、权重体积。
它们在第 1-5 课反复出现（量化前后比困惑度、DPO/奖励模型给回答打分、偏见扫描比句子概率……），
写错一处（忘了左移一位、把填充位也算进去）数字就悄悄不对，所以只写一次。
"""
from __future__ import annotations

import io
import math
from typing import Any


def token_logprobs(logits: Any, targets: Any) -> Any:
    """logits[..., t, :] 是对第 t+1 个 token 的预测：调用方先对齐（logits[:, :-1] 配 ids[:, 1:]），这里取 log p。
    先转 fp32 再 log_softmax：bf16 的 8 位尾数在 5 万词表上求和时误差可达 1e-2，比要比的差还大。
    """
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model: Any, input_ids: Any, attention_mask: Any = None, mask: Any = None, **kwargs: Any) -> Any:
    """每条序列在 mask（与 input_ids 同形，1 = 要计入的 token，如回答部分）上的 log p 之和。
    mask 缺省 = attention_mask（整句，去掉填充）。第 0 个 token 没有上文，永远不计。
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, :-1]
    logp = token_logprobs(logits, input_ids[:, 1:])
    keep = mask if mask is not None else attention_mask
    return logp.sum(-1) if keep is None else (logp * keep[:, 1:].to(logp.dtype)).sum(-1)


def pad_right(rows: list[dict], pad_token_id: int) -> dict:
    """[{input_ids, labels?}] -> 右填充到批内最长的张量批：input_ids / attention_mask /（有就带）labels（填 -100）。
    因果模型右填充不改变真实 token 的位置编号，前向结果与一条一条算相同；生成时才需要左填充（见 models.generate）。
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.tensor([list(r["input_ids"]) + [pad_token_id] * (width - len(r["input_ids"]))
                                        for r in rows]),
             "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                             for r in rows])}
    if all("labels" in r for r in rows):
        batch["labels"] = torch.tensor([list(r["labels"]) + [-100] * (width - len(r["labels"])) for r in rows])
    return batch


def perplexity(model: Any, rows: list[dict], batch_size: int = 8, pad_token_id: int = 0) -> float:
    """exp(平均每 token 负对数似然)：rows = [{input_ids, labels?}]，labels 为 -100 的位置不计（如提示、滑窗的上文）。
    按 token 加权平均（不是按样本平均再平均）：长短样本混在一起时，这才是"每个 token 的"困惑度。
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    rows = [r if "labels" in r else {**r, "labels": list(r["input_ids"])} for r in rows if len(r["input_ids"]) > 1]
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(device) for k, v in pad_right(rows[i:i + batch_size], pad_token_id).items()}
            logp = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1],
                                  b["input_ids"][:, 1:])
            keep = b["labels"][:, 1:] != -100
            nll -= logp[keep].sum().item()
            count += int(keep.sum())
    return math.exp(nll / max(count, 1))


def size_mb(model: Any) -> float:
    """state_dict 序列化一次的字节数（MB）：部署时真正要读进内存的体积（共享张量只算一次，量化的缩放常数也算上）。"""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20
