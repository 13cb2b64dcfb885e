"""RLHF 三个阶段要在同一批 (input_ids, attention_mask) 上量的几个数：回答 token 的 log π 与熵、
打分头在最后一个真实 token（奖励模型）/ 每个位置（critic 的价值 V）上的分数，以及 RM 在偏好对上的分数与准确率。

只有 02 用到它们（03 用 TRL 的 RewardTrainer，04 用 TRL 的 DPOTrainer），所以放在本课旁边，不进 common/。
生成时是左填充：位置编号必须从第一个真实 token 起算，否则同一句话换个填充长度，输出就变了——
PPO 的 ρ = π_new/π_old 会因为填充而偏离 1，截断也就失去意义。
"""
from __future__ import annotations

from common import data
from common.errors import UserError, brief


def positions(mask):
    """左填充批次的 position_ids：每行从第一个真实 token 起 0, 1, 2, ...（填充位钳到 0，反正被 mask 掉）。"""
    # 与 transformers generate() 推位置编号的做法一致（attention_mask.cumsum − 1）：真实 token 的编号与采样时相同；
    # 填充位的编号和它不同也无妨，反正被 mask 掉；右填充时真实 token 本来就从 0 起，结果也对
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _base(model):
    """LoRA 包装（PeftModel）-> 里面注入了 adapter 的 transformers 模型；普通模型原样返回。"""
    # 不拆会取错：PeftModel 把不认识的属性转发给 LoraModel，而 LoraModel 自己的 .model 是整个 transformers 模型，
    # getattr(peft, "model") 拿到的就不是主干
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hidden(model, ids, mask):
    """序列分类模型的主干隐状态（不经过打分头）：要自己挑哪个位置的隐状态去打分。"""
    model = _base(model)
    # base_model_prefix：主干的属性名随架构而变（Llama / Qwen2 是 "model"），按配置取，不写死；
    # 显式传 position_ids：左填充下不传，同一句话的输出会随填充长度变（见模块文档）
    return getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=positions(mask))[0]


def last_token_scores(rm, ids, mask):
    """奖励模型：主干隐状态 -> 最后一个真实 token -> score 头 = 每条序列一个标量。

    不用 transformers 自带的"找 pad_token_id"：PPO 的回答在第一个 eos 后全是填充，而 eos 常常就是 pad，
    那样会取错位置；这里直接用 attention_mask 找最后一个 1。
    """
    import torch

    h = _hidden(rm, ids, mask)
    # 翻转后 argmax 取到第一个 1（PyTorch 的 argmax 遇到并列返回第一个下标）= 原序列最后一个 1；
    # 左填充、右填充、eos 之后的填充都适用
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    # 转 fp32：bf16 只有 8 位尾数，之后的分差、截断、白化都在这个数上算
    return _base(rm).score(h[torch.arange(len(ids)), last]).squeeze(-1).float()


def token_scores(model, ids, mask):
    """同一个打分头作用在每个位置上（PPO 的 critic：每个前缀的价值 V）。"""
    # LoRA + SEQ_CLS 时 score 被 PEFT 包成 ModulesToSaveWrapper：调用它走的是正在训练的那份副本
    return _base(model).score(_hidden(model, ids, mask)).squeeze(-1).float()


def response_logprobs(model, ids, mask, start: int):
    """从位置 start 起（回答部分）每个 token 的 log π 与分布的熵：位置 t 的 logits 预测 t+1 的 token。

    熵要整个词表的分布：log_softmax 只做一次（先转 fp32），log π 与熵都从它取——PPO 每步都要算，
    再调一次 lm.token_logprobs 等于把 (批 × 长度 × 词表) 的 log_softmax 重算一遍。
    """
    import torch

    # 从 start − 1 取到倒数第二位：位置 t 的 logits 预测第 t+1 个 token；少错开一位，每个 log π 都配错了 token
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, start - 1:-1]
    logp_all = torch.log_softmax(logits.float(), -1)
    logp = logp_all.gather(-1, ids[:, start:, None]).squeeze(-1)
    # 熵在整个词表上算（−Σ p·log p）：只看采到的 token 的概率，看不出分布是否正在塌缩
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def load_reward_model(path, dtype, device, flag: str | None = None):
    """RM = 与 actor 同一个起点加一个标量打分头（DeepSpeed-Chat 做法）；path 也可以是 03 训练好的奖励模型。

    同一个起点：RM 与 actor 共用分词器和表示，RM 读得懂 actor 写出来的每个 token。
    flag：目录是用户给的（--reward-model）时，加载失败一行点名它（config 的值不对、权重文件坏了……）。
    """
    from transformers import AutoModelForSequenceClassification

    try:
        # num_labels=1：一个标量分数（Bradley–Terry 只用分差）；只读 safetensors：
        # .bin 是 pickle，加载时能执行任意代码，用户给的目录不该被这样信任
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                  use_safetensors=True).to(device)
    except Exception as e:  # noqa: BLE001 - 任何加载失败对学生都是同一件事：这个目录当不了奖励模型
        if flag is None:
            raise
        raise UserError(f"{flag} {path}: 无法加载（{type(e).__name__}: {brief(e)}）") from None


def text_of(x) -> str:
    """回答可能是字符串或消息列表（对话格式）：RM 只要最后一条助手消息的正文。"""
    return x if isinstance(x, str) else x[-1]["content"]


def encode(tok, texts, device, max_length: int):
    """RM 打分用右填充：last_token_scores 按 attention_mask 找最后一个真实 token，填充在哪边都不影响它。"""
    # 超过 max_length 按分词器默认从右边截：截掉的是回答结尾和 eos，分数就打在半句话上，所以 max_length 要够长；
    # add_special_tokens=False：文本已由对话模板渲染，特殊 token 不再加一遍
    tok.padding_side = "right"
    return tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
               add_special_tokens=False).to(device)


def pair_scores(rm, tok, pairs, max_length: int):
    """RM 的输入：对话模板渲染的 prompt + 回答 + eos（与 PPO 生成的回答同一格式）；返回 (chosen 分, rejected 分)。

    格式必须与阶段 3 一致：RM 训练时没见过的格式（比如少了 eos），打出的分数对 PPO 没有意义。
    """
    pt = [data.prompt_text(tok, p["prompt"]) for p in pairs]
    # chosen 与 rejected 拼成一批：同一次前向，两半的填充长度一致，分数可比
    texts = [a + text_of(p[key]) + tok.eos_token for key in ("chosen", "rejected") for a, p in zip(pt, pairs)]
    enc = encode(tok, texts, rm.device, max_length)
    return last_token_scores(rm, enc.input_ids, enc.attention_mask).chunk(2)


def rm_accuracy(rm, tok, pairs, max_length: int) -> float:
    """留出对里 r(chosen) > r(rejected) 的比例：0.5 是瞎猜；RM 排不对，PPO 优化的就是噪声。"""
    import torch

    rm.eval()
    with torch.no_grad():
        # 每次 16 对（= 32 条序列一次前向）：限住激活内存；严格 > 0，分数相同算排错
        hits = sum((torch.sub(*pair_scores(rm, tok, pairs[i:i + 16], max_length)) > 0).sum().item()
                   for i in range(0, len(pairs), 16))
    return hits / len(pairs)
