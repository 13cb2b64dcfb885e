"""RLHF 三阶段（DeepSpeed-Chat 的做法）：SFT -> 奖励模型 -> PPO；PPO 用 PyTorch 亲手写出来。

TRL 1.x 已经没有 PPOTrainer（旧教程的 `from trl import PPOTrainer` 会直接失败），PPO 的每一步都在本文件里：
  四个模型：actor（要训练的策略，来自 SFT）、reference（SFT 的冻结副本）、critic（价值头，用 RM 初始化）、冻结的 RM。
  1) 经验生成：actor 对一批 prompt 采样回答；记下 actor 与 ref 的逐 token log π、critic 的逐 token V、RM 的序列分数；
  2) 逐 token 奖励：r_t = −β·(log π(a_t) − log π_ref(a_t))，最后一个 token 再加上截断到 [−c, c] 的 RM 分数；
  3) GAE：δ_t = r_t + γV_{t+1} − V_t，A_t = Σ (γλ)^k δ_{t+k}；回报 R_t = A_t + V_t；优势再做白化；
  4) ppo_epochs 轮、每轮若干 minibatch：截断的策略损失 max(−A·ρ, −A·clip(ρ, 1±ε))，ρ = π_new/π_old；
     截断的价值损失 ½·max((V−R)², (V_old + clip(V−V_old, ±ε_v) − R)²)。
`--algo grpo|rloo`：换成 TRL 的 GRPOTrainer / RLOOTrainer（同一 RM），没有 critic，优势来自同一 prompt 的一组采样
互相比较（所以不报 value_loss_last）。

运行：
  python lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py                 # CPU，smollm2-135m
  python lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py --smoke         # tiny-llama，全参数
  python lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py --smoke --algo grpo   # 同一 RM，TRL GRPO
  python lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py --model Qwen/Qwen2.5-1.5B-Instruct --source hf \\
      --config configs/lesson4/rlhf_pipeline_gpu.yaml                          # GPU
  --reward-model DIR：直接用 03 训练好的奖励模型（跳过第 2 阶段）；--data：自己的偏好文件。

你会看到（默认，smollm2-135m + LoRA，PPO 12 次迭代）：第 2 阶段后奖励模型在留出偏好对上的准确率从随机打分头的水平
明显升高；第 3 阶段后留出 prompt 贪心回答的平均 RM 分数升高，而每条回答的 KL(actor‖ref) 仍然很小——逐 token 的 KL 惩罚
把策略拴在 SFT 附近；策略的熵缓降而不塌（塌到 0 = 只会说一句话）。--smoke 是全参数训练，策略能走得远得多，KL 也大得多；
--algo grpo 用同一个 RM、同一条 CLAIMS（参考运行只录了 PPO；GRPO 是否同样推高留出奖励，跑一次看 ✓/✗）。
冒烟只查 RM 准确率、KL 与熵：玩具模型上几步 RL 的奖励变化随种子正负摆动。
输出 ppo_curves.png（reward / KL / entropy 随迭代变化）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：11.8 分钟，10.2 GB（超过 10 分钟、超过 8 GB），结论 4/4 成立
  ✓ 奖励模型学会排序留出偏好对：准确率 阶段 2 训练后 − 训练前（新打分头）：0.4179（≥ 0.25）
  ✓ 第 3 阶段（PPO，或 --algo 选的 GRPO / RLOO）提高留出 prompt 贪心回答的平均 RM 分数：之后 − 之前：0.9068（≥ 0.4）
  ✓ KL 惩罚把策略拴在 SFT 参考附近：最终每条回答的 KL(actor‖ref)（nat）：0.04445（≤ 0.5）
  ✓ 策略的熵缓降而不塌掉（塌到 0 = 只会说一句话）：最后一次迭代的熵 / 第一次的：0.8294（≥ 0.5）
<!-- /results -->
详见同目录 README.md。
"""
import copy
import random
from dataclasses import dataclass

import torch

from common import cli, data, lm, models, run, train

# 只属于本课的打分原语（建 RM、回答的 log π 与熵、RM / critic 的打分头）：放在旁边的 _scoring.py，不进 common/
scoring = run.import_sibling(__file__, "_scoring")


@dataclass
class Args(cli.CommonArgs):
    algo: str = cli.arg("ppo", "第 3 阶段算法：ppo（本文件手写）/ grpo / rloo（TRL）", choices=["ppo", "grpo", "rloo"])
    sft_steps: int = cli.arg(20, "阶段 1：在 prompt+chosen 上 SFT 的步数（0 = 跳过）", min=0)
    rm_steps: int = cli.arg(30, "阶段 2：奖励模型成对训练的步数", min=1)
    reward_model: str = cli.arg(None, "已训练好的奖励模型目录（如 03 的 outputs/.../reward_model）；给了就跳过阶段 2")
    ppo_steps: int = cli.arg(12, "阶段 3：迭代次数（每次 = 生成一批经验 + ppo_epochs 轮更新）", min=1)
    rollout_batch: int = cli.arg(8, "每次迭代采样多少个 prompt 的回答", min=2)
    ppo_epochs: int = cli.arg(2, "同一批经验重复用几轮（截断让它不至于走太远）", min=1)
    mini_batch_size: int = cli.arg(4, "PPO minibatch 大小", min=1)
    max_new_tokens: int = cli.arg(32, "回答最多多少个新 token", min=1)
    kl_coef: float = cli.arg(0.05, "β：逐 token 的 KL 惩罚系数（GRPO/RLOO 的 beta）", min=0)
    cliprange: float = cli.arg(0.2, "ε：策略比值 ρ 的截断范围", min=0, max=1)
    cliprange_value: float = cli.arg(0.2, "ε_v：价值的截断范围", min=0)
    reward_clip: float = cli.arg(5.0, "RM 分数截断到 [−c, c]，防止奖励黑客拿到极端分数", min=0)
    gamma: float = cli.arg(1.0, "折扣因子 γ（回答很短，不打折）", min=0, max=1)
    lam: float = cli.arg(0.95, "GAE 的 λ：偏差-方差折中", min=0, max=1)
    learning_rate: float = cli.arg(5e-5, "actor 学习率（LoRA；全参数 --lora-r 0 时用 ~1e-6）")
    critic_learning_rate: float = cli.arg(1e-4, "critic 学习率（LoRA + 全参数的打分头；全参数时 ~5e-6）")
    sft_learning_rate: float = cli.arg(2e-4, "阶段 1 学习率（LoRA；全参数 ~2e-5）")
    rm_learning_rate: float = cli.arg(2e-4, "阶段 2 学习率（LoRA；全参数 ~5e-5）")
    lora_r: int = cli.arg(16, "LoRA 秩：阶段 1、2 训练后合并；阶段 3 actor、critic 各挂一个；0 = 全参数", min=0)
    lora_alpha: int = cli.arg(32, "LoRA 缩放系数", min=1)
    num_generations: int = cli.arg(4, "GRPO/RLOO：每个 prompt 采样几个回答互相比较", min=2)
    max_length: int = cli.arg(256, "SFT/RM 样本最多多少 token", min=8)
    val_fraction: float = cli.arg(0.2, "留出比例：RM 准确率与 PPO 前后奖励都在留出部分上量", min=0.01, max=0.9)

    smoke_model = "tiny-llama"


# 冒烟：极小模型承受大学习率；小批量、短回答，几十秒内跑完三个阶段
SMOKE = dict(lora_r=0, sft_steps=20, rm_steps=30, ppo_steps=12, rollout_batch=16, mini_batch_size=8, max_new_tokens=16,
             learning_rate=3e-4, critic_learning_rate=1e-3, sft_learning_rate=1e-3, rm_learning_rate=1e-3,
             max_length=128)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测（新打分头、PPO 前的 actor）
# 奖励上升只在默认模式检查：1.1M 参数的随机玩具上 12 步 RL，奖励变化随种子和 CPU 在 -0.3 … +1.7 之间摆动
# （实测 PPO / GRPO 各 3-4 个种子，Intel 与 AMD 各一台），冒烟时它证明不了什么；smollm2 上的默认运行才检查
CLAIMS = [
    run.Claim("奖励模型学会排序留出偏好对：准确率 阶段 2 训练后 − 训练前（新打分头）",
              "rm_eval_accuracy - rm_eval_accuracy_before", ">=", 0.2, 0.25),
    run.Claim("第 3 阶段（PPO，或 --algo 选的 GRPO / RLOO）提高留出 prompt 贪心回答的平均 RM 分数：之后 − 之前",
              "reward_after - reward_before", ">=", None, 0.4),
    run.Claim("KL 惩罚把策略拴在 SFT 参考附近：最终每条回答的 KL(actor‖ref)（nat）", "kl_final", "<=", 10, 0.5),
    run.Claim("策略的熵缓降而不塌掉（塌到 0 = 只会说一句话）：最后一次迭代的熵 / 第一次的",
              "entropy_final / entropy_first", ">=", 0.5, 0.5),
]


def with_lora(model, args, task: str):
    """手写循环用：r > 0 时挂上 LoRA（原权重冻结），r = 0 原样返回（全参数）。TRL 的训练器直接收 peft_config。"""
    if not args.lora_r:
        return model
    from peft import get_peft_model

    return get_peft_model(model, train.lora_config(args.lora_r, args.lora_alpha, task))


def stage1_sft(actor, tok, pairs, args, rng, log):
    """阶段 1：在 prompt + chosen 上做监督微调（只在回答 token 上算损失）；返回合并后的 actor。"""
    # tokenize_chat 把 prompt 部分的 labels 设成 -100：不然模型也在学复述用户的提问
    rows = [data.tokenize_chat(tok, p["prompt"] + [{"role": "assistant", "content": p["chosen"][-1]["content"]}],
                               args.max_length) for p in pairs]
    actor = with_lora(actor, args, "CAUSAL_LM")
    # 只把可训练参数交给 AdamW：LoRA 时冻结的原权重不占它的两份状态（一阶、二阶动量）
    opt = torch.optim.AdamW(train.trainable_params(actor), lr=args.sft_learning_rate)
    actor.train()
    for step in range(args.sft_steps):
        # rng 是 main 里按 --seed 建的同一个 Random：三个阶段的抽样顺序都能复现
        batch = lm.pad_right(rng.sample(rows, min(8, len(rows))), tok.pad_token_id)
        loss = train.optimizer_step(opt, actor(**{k: v.to(actor.device) for k, v in batch.items()}).loss)
        if step % 10 == 0 or step == args.sft_steps - 1:
            log.info(f"[SFT] step {step + 1}/{args.sft_steps} loss {loss:.3f}")
    # 合并：阶段 3 要把它复制成 ref、再挂一个新 adapter 当 actor；不合并，两层 adapter 叠在一起分不清谁在训练
    return train.merge_lora(actor)


def stage2_reward_model(rm, tok, train_pairs, eval_pairs, args, rng, log):
    """阶段 2：成对损失 −log σ(r_c − r_r)（Bradley–Terry，同 03，手写循环）；返回 (合并后的 RM, 留出准确率)。"""
    rm = with_lora(rm, args, "SEQ_CLS")   # SEQ_CLS：打分头是新初始化的，PEFT 让它全参数训练（低秩增量学不出它）
    opt = torch.optim.AdamW(train.trainable_params(rm), lr=args.rm_learning_rate)
    rm.train()
    for step in range(args.rm_steps):
        sc, sr = scoring.pair_scores(rm, tok, rng.sample(train_pairs, min(8, len(train_pairs))), args.max_length)
        # 只有分差进损失：RM 分数的绝对值没有意义，所以阶段 3 要截断它、PPO 要白化优势
        # logsigmoid 而不是 log(sigmoid(x))：分差很负时 sigmoid 下溢成 0，log 得到 −inf
        loss = train.optimizer_step(opt, -torch.nn.functional.logsigmoid(sc - sr).mean())
        if step % 20 == 0 or step == args.rm_steps - 1:
            log.info(f"[RM] step {step + 1}/{args.rm_steps} loss {loss:.3f}")
    return train.merge_lora(rm), scoring.rm_accuracy(rm, tok, eval_pairs, args.max_length)


def rollout(actor, tok, prompts: list[str], max_new_tokens: int, greedy: bool = False):
    """actor 生成回答；返回 (序列, 掩码, prompt 长度)。回答掩码保留到第一个 eos（含）为止。"""
    tok.padding_side = "left"   # 生成要左填充：右填充时新 token 会接在填充后面
    # 提示已由对话模板渲染（特殊 token 都在文本里）：再自动加一遍 BOS，就和 RM 训练时见到的格式不一样了
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(actor.device)
    actor.eval()
    with torch.no_grad():
        # top_k=0、top_p=1：从完整分布采样。截掉尾部的话，采样分布就不是 π，log π 算出的 ρ 与 KL 都有偏
        seq = actor.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy, top_k=0, top_p=1.0,
                             pad_token_id=tok.pad_token_id)
    start = enc.input_ids.shape[1]
    is_eos = (seq[:, start:] == tok.eos_token_id).int()
    # 掩码含第一个 eos 本身：“在这里停下”也是策略的一个动作，它的 log π 要进 ρ 与 KL
    resp_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()   # 第一个 eos 之后的位置全是填充
    return seq, torch.cat([enc.attention_mask, resp_mask], 1), start


def mean_reward(actor, rm, tok, prompts, args) -> float:
    """留出 prompt 上贪心回答的平均 RM 分数（PPO 前后用同一把尺子；贪心 = 没有采样噪声）。"""
    scores = []
    # 每批 16 条：生成时的 KV 缓存随批大小线性增长，分批后留出集再大也不会撑爆内存
    for i in range(0, len(prompts), 16):
        seq, mask, _ = rollout(actor, tok, prompts[i:i + 16], args.max_new_tokens, greedy=True)
        with torch.no_grad():
            scores += scoring.last_token_scores(rm, seq, mask).tolist()
    return sum(scores) / len(scores)


def make_experience(actor, ref, critic, rm, tok, prompts, args) -> dict:
    """PPO 第 1-3 步：采样、打分、逐 token 奖励（KL 惩罚 + 末尾 RM 分数）、GAE。"""
    seq, mask, start = rollout(actor, tok, prompts, args.max_new_tokens)
    rmask = mask[:, start:].float()
    with torch.no_grad():
        # no_grad：这些是“旧策略”时的量，PPO 更新时当常数用（ρ 的分母、GAE 的基线），不能带梯度
        logp, _ = scoring.response_logprobs(actor, seq, mask, start)
        ref_logp, _ = scoring.response_logprobs(ref, seq, mask, start)
        values = scoring.token_scores(critic, seq, mask)[:, start - 1:-1] * rmask   # V(前缀)：生成第 t 个 token 之前
        score = scoring.last_token_scores(rm, seq, mask)
    # KL 惩罚逐 token 给（InstructGPT）：没有它，策略会漂到 RM 没见过、却恰好给高分的胡话上（奖励黑客）
    kl = (logp - ref_logp) * rmask
    rewards = -args.kl_coef * kl
    # RM 分数只在最后一个回答 token 上给一次（它评的是整条回答），其余位置只有 KL 惩罚
    last = rmask.sum(1).long() - 1
    rewards[torch.arange(len(seq)), last] += score.clamp(-args.reward_clip, args.reward_clip)
    adv, gae = torch.zeros_like(rewards), torch.zeros(len(seq), device=seq.device)
    # GAE（Schulman 2016）从后往前累加：λ=1 是蒙特卡洛回报（无偏、方差大），λ=0 只信 critic（方差小、有偏）
    for t in reversed(range(rewards.shape[1])):
        # 最后一步之后没有下一状态，V 记 0；eos 之后的填充位 rewards、values 都已被 rmask 清零，
        # δ = 0，不会把填充的“价值”倒灌回回答
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        gae = rewards[:, t] + args.gamma * next_v - values[:, t] + args.gamma * args.lam * gae
        adv[:, t] = gae
    returns = (adv + values) * rmask
    # 均值、方差只在回答 token 上算：填充位的 0 混进来，会把均值拉向 0、方差算小
    mu = (adv * rmask).sum() / rmask.sum()
    var = (((adv - mu) * rmask) ** 2).sum() / rmask.sum()
    adv = (adv - mu) / (var.sqrt() + 1e-8) * rmask   # 白化：尺度稳定，学习率不必随奖励大小重调
    # kl 按整条回答求和（nat/条）再对批平均：与 CLAIMS 里 kl_final 的单位一致
    return dict(seq=seq, mask=mask, start=start, rmask=rmask, logp=logp * rmask, values=values, returns=returns,
                adv=adv, score=score.mean().item(), kl=kl.sum(1).mean().item())


def ppo_update(actor, critic, opt_a, opt_c, exp, args) -> tuple[float, float, float]:
    """PPO 第 4 步：ppo_epochs 轮 minibatch；截断的策略损失与价值损失。返回最后一个 minibatch 的损失与平均熵。"""
    n, ents = len(exp["seq"]), []
    actor.train()
    critic.train()
    for _ in range(args.ppo_epochs):
        # 每轮重新打乱：minibatch 的组合每轮不同，不会按固定顺序反复朝同一个方向推
        for idx in torch.randperm(n).split(args.mini_batch_size):
            ids, mask, m, adv = exp["seq"][idx], exp["mask"][idx], exp["rmask"][idx], exp["adv"][idx]
            logp, ent = scoring.response_logprobs(actor, ids, mask, exp["start"])
            # 先乘掩码再 exp：填充位的 ρ = exp(0) = 1，那里 log π 的任意值不会变成 inf / NaN
            ratio = torch.exp((logp - exp["logp"][idx]) * m)
            # 截断（Schulman 2017）：ρ 离开 [1−ε, 1+ε] 后梯度为 0，同一批经验反复用几轮也不会一步走太远
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
            # 传入参数 = 梯度裁剪到范数 1.0（optimizer_step 的默认）：RL 的梯度偶有尖峰，一步就能把策略推垮；
            # actor 与 critic 不共享参数（critic 是 RM 的副本），两个损失各自反传，不必加权相加
            pg_loss = train.optimizer_step(opt_a, (pg * m).sum() / m.sum(), actor.parameters())
            v = scoring.token_scores(critic, ids, mask)[:, exp["start"] - 1:-1]
            old_v, ret = exp["values"][idx], exp["returns"][idx]
            # 价值也截断：critic 一步跳太远，下一批的优势全跟着抖
            v_clip = old_v + (v - old_v).clamp(-args.cliprange_value, args.cliprange_value)
            vf = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum()
            vf_loss = train.optimizer_step(opt_c, vf, critic.parameters())
            ents.append(((ent * m).sum() / m.sum()).item())
    return pg_loss, vf_loss, sum(ents) / len(ents)


def stage3_ppo(actor, rm, tok, prompts, args, rng, log):
    """阶段 3：PPO 的四个模型与迭代循环；返回 (训练后的 actor, 每次迭代的记录)。"""
    # ref = SFT 后的冻结副本：KL 惩罚量的是"离 SFT 多远"，它一动，惩罚就失去了锚点
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    # critic 用 RM 初始化（DeepSpeed-Chat）：它已经会从隐状态读出"回答好不好"，比随机的价值头收敛快得多
    critic = with_lora(copy.deepcopy(rm).requires_grad_(True), args, "SEQ_CLS")
    actor = with_lora(actor, args, "CAUSAL_LM")
    opt_a = torch.optim.AdamW(train.trainable_params(actor), lr=args.learning_rate)
    opt_c = torch.optim.AdamW(train.trainable_params(critic), lr=args.critic_learning_rate)
    hist = []
    for it in range(args.ppo_steps):
        exp = make_experience(actor, ref, critic, rm, tok, rng.sample(prompts, min(args.rollout_batch, len(prompts))),
                              args)
        pg, vf, ent = ppo_update(actor, critic, opt_a, opt_c, exp, args)
        hist.append(dict(step=it + 1, reward=exp["score"], kl=exp["kl"], entropy=ent, policy_loss=pg, value_loss=vf))
        log.info(f"[PPO] iter {it + 1}/{args.ppo_steps} reward {exp['score']:.3f} KL {exp['kl']:.3f} "
                 f"entropy {ent:.2f} policy_loss {pg:.4f} value_loss {vf:.4f}")
    return actor, hist


def stage3_trl(algo, actor, tok, rm, prompts, args, out) -> list[dict]:
    """对照：TRL 的 GRPO / RLOO，奖励函数就是同一个冻结 RM（不同的只有优势怎么估）。"""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    def rm_reward(prompts, completions, **_):
        # 补上 eos：TRL 交给奖励函数的 completion 是 skip_special_tokens 解码的文本，没有 eos；
        # RM 在阶段 2 见到的都是“回答 + eos”（pair_scores），缺了它分数就不可比
        enc = scoring.encode(tok, [p + c + tok.eos_token for p, c in zip(prompts, completions)], rm.device, 512)
        with torch.no_grad():
            scores = scoring.last_token_scores(rm, enc.input_ids, enc.attention_mask)
        return scores.clamp(-args.reward_clip, args.reward_clip).tolist()   # 与 PPO 同样截断，才算同一个奖励

    Config, Trainer = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    # 批大小须是 num_generations 的整数倍：一个 prompt 的一组回答要落在同一批里才能互相比较
    bs = max(args.num_generations, args.rollout_batch // args.num_generations * args.num_generations)
    cfg = Config(output_dir=str(out.path("trainer")), seed=args.seed, max_steps=args.ppo_steps, beta=args.kl_coef,
                 learning_rate=args.learning_rate, per_device_train_batch_size=bs, num_generations=args.num_generations,
                 max_completion_length=args.max_new_tokens, logging_steps=1, save_strategy="no",
                 report_to=out.trainer_report_to(), top_k=0,   # top_k=0：与 PPO 一样从完整分布采样
                 **train.trainer_flags(actor, log=False))
    trainer = Trainer(model=actor, reward_funcs=rm_reward, args=cfg, processing_class=tok,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.train()
    # 只取带 reward 的记录：log_history 里还有训练结束时的汇总行（train_runtime 等），没有这些键
    return [dict(step=h["step"], reward=h.get("reward", 0.0), kl=h.get("kl", 0.0), entropy=h.get("entropy", 0.0),
                 policy_loss=h.get("loss", 0.0)) for h in trainer.state.log_history if "reward" in h]


def plot_curves(out, hist, title: str) -> None:
    """reward 升、KL 有界、熵缓降才是健康的 PPO；熵塌到 0 说明策略只会说一句话了。"""
    fig, save = out.plot("ppo_curves.png")
    for i, key in enumerate(("reward", "kl", "entropy")):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot([h["step"] for h in hist], [h[key] for h in hist], "o-", ms=3)
        ax.set_xlabel("iteration")
        ax.set_title(key)
    fig.suptitle(title)
    save()


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    rng = random.Random(args.seed)

    # 0. 数据：偏好对切成训练 / 留出；PPO 只用 prompt。留出的 prompt 不进任何一个阶段，前后比的才不是背下来的
    train_pairs, eval_pairs = map(data.preference_conversational,   # 统一成消息列表：prompt 是 user 消息
                                  data.preference_split(args.data, args.val_fraction, args.seed, min_train=8))
    # 现成的 RM 先查、先加载（精度、设备与 actor 相同）：目录不存在、没有权重、config 或权重坏了，都在加载 actor
    # 之前一行报错点名 --reward-model，而不是等 actor 加载完、训完 SFT 才崩
    dev = models.pick_device(args.device)
    given_rm = scoring.load_reward_model(models.check_dir(args.reward_model, "--reward-model"),
                                         models.pick_dtype(args.dtype, dev, for_training=True), dev,
                                         "--reward-model") if args.reward_model else None
    actor, tok = models.load_args(args, for_training=True)

    # 1. 阶段 1：SFT。PPO 只会在策略自己采得到的回答里挑好的；起点不会答，RM 再准也没有好回答可奖励
    actor = stage1_sft(actor, tok, train_pairs, args, rng, out.log) if args.sft_steps else actor

    # 2. 阶段 2：奖励模型（同一个起点加打分头；或直接用 --reward-model）
    rm = given_rm if given_rm is not None else \
        scoring.load_reward_model(models.resolve(out.model_name, args.source), actor.dtype, actor.device)
    rm.config.pad_token_id = tok.pad_token_id   # 分类前向靠它找末 token；存盘复用时须与分词器一致
    # 基线：新打分头（还没训练）的留出准确率，阶段 2 训练后要和它比；--reward-model 时 RM 已训练好，没有这个基线
    rm_before = None if args.reward_model else scoring.rm_accuracy(rm, tok, eval_pairs, args.max_length)
    rm, rm_acc = ((rm, scoring.rm_accuracy(rm, tok, eval_pairs, args.max_length)) if args.reward_model
                  else stage2_reward_model(rm, tok, train_pairs, eval_pairs, args, rng, out.log))
    out.log.info(f"奖励模型留出准确率 {rm_acc:.3f}")
    rm.eval().requires_grad_(False)   # 阶段 3 里 RM 只打分：它也跟着训练，actor 就能"说服"它给高分

    # 3. 阶段 3：PPO（或 GRPO / RLOO）；前后用同一把尺子（留出 prompt 的贪心回答）量平均奖励
    train_prompts, eval_prompts = ([data.prompt_text(tok, p["prompt"]) for p in ps] for ps in (train_pairs, eval_pairs))
    before = mean_reward(actor, rm, tok, eval_prompts, args)
    out.log.info(f"PPO 前：留出 prompt 的平均奖励 {before:.3f}")
    if args.algo == "ppo":
        actor, hist = stage3_ppo(actor, rm, tok, train_prompts, args, rng, out.log)
    else:
        hist = stage3_trl(args.algo, actor, tok, rm, train_prompts, args, out)
    after = mean_reward(actor, rm, tok, eval_prompts, args)
    out.log.info(f"{args.algo.upper()} 后：留出 prompt 的平均奖励 {after:.3f}")

    # 4. 曲线与指标：只看 reward 会被奖励黑客骗过，KL 与熵要一起看
    plot_curves(out, hist, f"{args.algo.upper()} on {out.model_name}: held-out reward {before:.2f} -> {after:.2f}")
    # kl / entropy 记成 _final（CLAIMS 按这个名字读）；两个损失记成 _last：它们只是最后一个 minibatch 的值
    last = {k: round(v, 5) for k, v in hist[-1].items() if k in ("kl", "policy_loss", "value_loss", "entropy")}
    metrics = {"algo": args.algo, "rm_eval_accuracy": round(rm_acc, 4), "reward_before": round(before, 4),
               "rm_eval_accuracy_before": None if rm_before is None else round(rm_before, 4),
               "entropy_first": round(hist[0]["entropy"], 5),
               "reward_after": round(after, 4), **{f"{k}_final" if k in ("kl", "entropy") else f"{k}_last": v
                                                   for k, v in last.items()},
               "rollout_reward_first": round(hist[0]["reward"], 4), "rollout_reward_last": round(hist[-1]["reward"], 4)}
    return out.finish(metrics, summary=f"RM 准确率 {rm_acc:.2f}；{args.algo.upper()} 留出平均奖励 {before:.3f} -> "
                                       f"{after:.3f}，最终 KL {hist[-1]['kl']:.3f}",
                      claims=CLAIMS if rm_before is not None else CLAIMS[1:])   # 第 1 条讲阶段 2，用现成 RM 时不适用


if __name__ == "__main__":
    main(cli.parse(Args))
