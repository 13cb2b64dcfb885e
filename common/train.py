"""训练的公共机械：按设备选 TrainingArguments 开关（bf16 / use_cpu / 梯度检查点），以及测峰值内存。

用自己的数据训练时（第 1 课 05 起，第 2-4 课可复用；第 3 课的加速实验用同一套开关做并排对比）：
  length_stats / describe_lengths / truncate   长度统计、超过 max_length 的条数与处理（截断 / 丢弃），一行说明
  pack / PackedCollator / packed_vs_padded_loss padding-free 打包（BFD 装行、position_ids 标边界）与等价性核对
  activation_gb / memory_budget_gb / auto_checkpointing   激活内存估计、预算、超预算自动开梯度检查点
  measure_step / step_peak_mb                   实测一步前向 + 反向的时间与峰值内存（开 / 关检查点对比）
  micro_batches / budget_steps                  一次前向的 token 上限 -> 梯度累积；时间预算内能跑几步
  eval_interval / step_timer                    评估开销 ≤ 10% 的间隔；第 1 步计时估计总时长、训练吞吐
按验证损失留最好的一步用 transformers 自带的 load_best_model_at_end + EarlyStoppingCallback（PEFT 下只存 / 装回 adapter）。
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any

from common.run import get_logger


def device_of(model: Any):
    """模型参数所在的设备。"""
    return next(model.parameters()).device


def trainer_flags(model: Any, gradient_checkpointing: bool = False, log: bool = True) -> dict:
    """给 TrainingArguments / SFTConfig / DPOConfig 的设备相关开关。

    - bf16 混合精度只在支持它的 CUDA 上开（CPU 训练保留 fp32：bf16 的 8 位尾数会吞掉小更新）；
    - use_cpu：模型在 CPU 上时告诉 Trainer 别去找 GPU；
    - 梯度检查点在任何设备上都按用户的意思开：它用重算换激活内存，CPU 上同样省内存（慢约 20-30%）。
    """
    import torch

    on_gpu = device_of(model).type == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    flags = dict(bf16=bf16, fp16=on_gpu and not bf16, use_cpu=not on_gpu, dataloader_pin_memory=on_gpu,
                 gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:   # 非重入实现：和 LoRA/冻结参数一起用时梯度也能正确回传
        flags["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if log:
        get_logger().info(("CUDA 训练：" + ("bf16 混合精度" if bf16 else "fp16 混合精度")) if on_gpu else
                          "CPU 训练：fp32（不开混合精度）" + ("，梯度检查点开" if gradient_checkpointing else ""))
    return flags


class PeakMemory:
    """with PeakMemory() as m: ...；之后 m.peak_mb = 这段代码执行期间比开始时多用的峰值内存（MB）。

    CUDA：torch.cuda.max_memory_allocated（精确）；CPU：后台线程每 2 ms 采一次进程 RSS，取最大值减去
    开始时的 RSS（RSS 含 Python/库的缓存，所以比较同一进程里的两段代码时才有意义）。
    """

    def __init__(self, device: Any = "cpu", interval_s: float = 0.002):
        self.cuda = str(device).startswith("cuda")
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.peak_abs_mb = 0.0

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._max = max(self._max, proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            import psutil

            self._start = self._max = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            import psutil

            self._stop.set()
            self._thread.join()
            peak = max(self._max, psutil.Process().memory_info().rss)
        self.peak_abs_mb = peak / 2**20
        self.peak_mb = (peak - self._start) / 2**20


def release_memory() -> None:
    """gc + 把空闲的堆内存还给系统（glibc malloc_trim）：大张量释放后 glibc 常把内存留在进程里，RSS 不降，
    下一段代码的峰值就叠在上面。顺便固定 mmap 阈值（64 KB），之后的大块分配用完即还。非 glibc 平台什么也不做。"""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    """本进程从启动到现在的最大常驻内存（MB；Linux ru_maxrss 以 KB 计）。"""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ---------------------------------------------------------------------------------------------------------------
# 用自己的数据训练时的机械（issue 16）：长度统计、padding-free 打包、激活内存估计、评估间隔、按验证损失留最好的一步
# ---------------------------------------------------------------------------------------------------------------

def length_stats(rows: list[dict], max_length: int) -> dict:
    """已编码样本（input_ids 未截断、labels 里 -100 以外是回答）-> 长度统计与超长情况。

    超过 max_length 的样本被截断时，丢掉的是尾部——对 SFT 来说恰好是回答的结尾：模型永远学不到怎么收尾。
    """
    lens = sorted(len(r["input_ids"]) for r in rows)
    over = [r for r in rows if len(r["input_ids"]) > max_length]
    cut_answer = sum(sum(x != -100 for x in r["labels"][max_length:]) for r in over)
    return {"records": len(rows), "tokens_mean": round(sum(lens) / max(1, len(lens)), 1),
            "tokens_p90": lens[min(len(lens) - 1, int(len(lens) * 0.9))] if lens else 0,
            "tokens_max": lens[-1] if lens else 0, "over_max_length": len(over),
            "answer_tokens_cut": int(cut_answer), "answer_tokens": int(sum(sum(x != -100 for x in r["labels"])
                                                                             for r in rows))}


def describe_lengths(stats: dict, max_length: int, policy: str) -> str:
    """一行中文：条数、token 平均 / p90 / 最大、多少条超过 --max-length、它们会怎样、怎么办。"""
    s = stats
    line = (f"训练数据 {s['records']} 条；token 平均 {s['tokens_mean']:.0f} / p90 {s['tokens_p90']} / "
            f"最大 {s['tokens_max']}；超过 --max-length {max_length} 的 {s['over_max_length']} 条")
    if not s["over_max_length"]:
        return line + "（没有被截断的）"
    if policy == "drop":
        return line + "：已丢弃（--over-length drop）"
    return line + (f"：截断，丢掉回答结尾 {s['answer_tokens_cut']} 个 token（占回答 token 的 "
                   f"{s['answer_tokens_cut'] / max(1, s['answer_tokens']):.0%}）；要保留请调大 --max-length "
                   f"{min(4096, 1 << (s['tokens_max'] - 1).bit_length())}，或 --over-length drop 丢掉这些样本")


def truncate(rows: list[dict], max_length: int, policy: str = "truncate") -> list[dict]:
    """按策略处理超长样本（truncate：截到 max_length；drop：整条丢掉）；只剩提示、没有回答 token 的样本去掉。"""
    if policy == "drop":
        rows = [r for r in rows if len(r["input_ids"]) <= max_length]
    rows = [{"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]} for r in rows]
    return [r for r in rows if any(x != -100 for x in r["labels"])]


def pack(rows: list[dict], max_length: int):
    """把样本按 Best-Fit-Decreasing 装进长度 ≤ max_length 的行（TRL 的 pack_dataset，"bfd"）。

    每行记下各段长度 seq_lengths，PackedCollator 据此给出每段从 0 开始的 position_ids：模型靠它区分段落边界。
    """
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return pack_dataset(ds, max_length, strategy="bfd")


class PackedCollator:
    """打包后的行 -> 批：input_ids / labels / position_ids，不给 attention_mask。

    没有 attention_mask、position_ids 在段落边界处归零时，transformers 会自己识别"打包序列"：
    sdpa / eager（CPU 也一样）构造块对角的因果掩码，flash-attention 用 position_ids 算出 cu_seqlens 走变长核；
    两种情况下每段只看得见自己，和单独一条一条算完全等价。前提是模型不建 KV 缓存（model.config.use_cache = False，
    否则 transformers 跳过打包识别、整行当成一段，悄悄算错）。每行第一个 token 的 label 置 -100：它在移位后
    会被上一段的最后一个 token "预测"，那不是要学的东西。各行末尾补的少量 pad 也各自成段、不算损失。
    """

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids, labels, pos = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            p = [i for L in e.get("seq_lengths", [n]) for i in range(L)]
            lab = [-100 if q == 0 else x for x, q in zip(e["labels"], p)]
            ids.append(list(e["input_ids"]) + [self.pad] * (width - n))
            labels.append(lab + [-100] * (width - n))
            pos.append(p + [0] * (width - n))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def padded_batch(rows: list[dict], pad_token_id: int) -> dict:
    """普通做法：右填充到批内最长，attention_mask 标出真实 token。"""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [pad_token_id] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}


def packed_vs_padded_loss(model, rows: list[dict], pad_token_id: int) -> tuple[float, float]:
    """同一批样本：填充成矩形算一次损失，首尾相接打包成一行再算一次。两者应相等（fp32 下差 ~1e-6）。"""
    import torch

    packed = PackedCollator(pad_token_id)([{"input_ids": sum((r["input_ids"] for r in rows), []),
                                            "labels": sum((r["labels"] for r in rows), []),
                                            "seq_lengths": [len(r["input_ids"]) for r in rows]}])
    padded = padded_batch(rows, pad_token_id)
    dev = device_of(model)
    was_training = model.training
    model.eval()   # 关掉 dropout：两次前向要可比
    with torch.no_grad():
        # use_cache=False：有 KV 缓存时 transformers 不会按 position_ids 识别打包（训练时也要关，见 PackedCollator）
        a = model(**{k: v.to(dev) for k, v in padded.items()}, use_cache=False).loss.item()
        b = model(**{k: v.to(dev) for k, v in packed.items()}, use_cache=False).loss.item()
    model.train(was_training)
    return a, b


def activation_gb(config: Any, tokens: int, rows: int, width: int, checkpointing: bool = False,
                  bytes_per: int = 4) -> float:
    """一步前向 + 反向要留着的激活量的粗估（GB）：决定要不要开梯度检查点。

    每层每 token 存约 10·hidden + 4·intermediate 个数（归一化输入、q/k/v、注意力输出、MLP 的 gate/up/激活/乘积…），
    外加注意力分数 heads·width² 每行（带掩码时 CPU 的 sdpa 走显式实现，要存概率矩阵），再加 logits 及其梯度
    约 3·tokens·vocab 个数。梯度检查点只保留每层的输入（hidden 个数/token），反向时一次重算一层。
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * h) or 4 * h
    heads = c.num_attention_heads
    per_layer = tokens * (10 * h + 4 * inter) + 2 * rows * heads * width * width
    logits = 3 * tokens * c.vocab_size
    total = (layers * tokens * h + per_layer if checkpointing else layers * per_layer) + logits
    return total * bytes_per / 2**30


def memory_budget_gb(requested: float = 0.0) -> float:
    """激活内存预算：用户给了就用；否则取本机当前可用内存（psutil）的四分之一——其余留给权重、优化器、
    分配器碎片（实测 RSS 峰值约为激活估计的 1.2-1.5 倍）和同一台机器上的别的程序。"""
    if requested and requested > 0:
        return float(requested)
    import psutil

    return psutil.virtual_memory().available / 2**30 / 4


def auto_checkpointing(config: Any, tokens: int, rows: int, width: int, budget_gb: float, requested: str = "auto",
                       bytes_per: int = 4) -> tuple[bool, str]:
    """按预算决定是否开梯度检查点；返回 (开不开, 一行说明)。requested：auto / on / off（用户强制时照办）。"""
    full = activation_gb(config, tokens, rows, width, False, bytes_per)
    ckpt = activation_gb(config, tokens, rows, width, True, bytes_per)
    est = f"一步约 {tokens} token，激活内存估计 {full:.2f} GB（开检查点 {ckpt:.2f} GB），预算 {budget_gb:.1f} GB"
    if requested in ("on", "off"):
        state = "开" if requested == "on" else "关"
        return requested == "on", f"{est} -> 梯度检查点{state}（--gradient-checkpointing {requested}）"
    on = full > budget_gb
    return on, f"{est} -> 梯度检查点{'自动打开：用约 30% 的重算换激活内存' if on else '不需要，关'}"


def eval_interval(eval_tokens: int, step_tokens: int, max_fraction: float = 0.1) -> int:
    """每隔几步评估一次，评估开销才 ≤ max_fraction：评估只有前向（≈ 训练一步同样 token 的 1/3 计算量）。"""
    return max(1, math.ceil(eval_tokens / (3 * step_tokens * max_fraction)))


def measure_step(model, batch: dict, checkpointing: bool, repeats: int = 1, loss_fn=None) -> tuple[float, float]:
    """实测一次前向 + 反向：-> (秒, 峰值内存增量 MB)。repeats > 1 时先空跑几次（第一次有分配器、线程池的预热开销），
    取最后一次。loss_fn(model, batch) 默认 model(**batch).loss；训练器的 compute_loss 也可以（见 trainer_step_seconds）。
    开 / 关梯度检查点对比内存用它；训练前按它估计一步要多久、时间预算内能跑几步。"""
    # transformers 5 把它改名为 activation_checkpointing_*（旧名仍可用但会告警）
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if checkpointing:
        enable({"use_reentrant": False})
    else:
        disable()
    was_training = model.training
    model.train()
    dev = device_of(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    for _ in range(repeats):
        with PeakMemory(dev) as m:
            t0 = time.perf_counter()
            loss = loss_fn(model, dict(batch)) if loss_fn else model(**batch, use_cache=False).loss
            loss.backward()
            del loss
            if m.cuda:
                import torch

                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
    disable()
    model.train(was_training)
    return seconds, m.peak_mb


def step_peak_mb(model, batch: dict, checkpointing: bool) -> float:
    """在 CPU/GPU 上实测一次前向 + 反向的峰值内存增量（MB），对比开 / 关梯度检查点用。"""
    return measure_step(model, batch, checkpointing)[1]


def trainer_step_seconds(trainer, batch: dict, accum: int, checkpointing: bool) -> float:
    """训练前实测训练器的一步（秒）：用它自己的 compute_loss（TRL 的分块 lm_head、token 级指标都在里面，
    实测比裸的 model(**batch).loss 慢 10-30%）做两次前向 + 反向取后一次，乘以梯度累积次数。
    量的是训练的第一个批次、参数还没更新，TRL 顺手记下的指标与第 1 步自己算的相同。"""
    return measure_step(trainer.model, batch, checkpointing, repeats=2,
                        loss_fn=lambda m, b: trainer.compute_loss(m, b))[0] * accum


def micro_batches(rows_per_step: int, width: int, micro_batch_tokens: int) -> tuple[int, int]:
    """一步要看 rows_per_step 行（每行 ≤ width token）；一次前向最多 micro_batch_tokens 个 token
    -> (每次前向几行, 梯度累积几次)。累积不改变一步的梯度（损失按整步的有效 token 数归一），只把激活内存
    （尤其是 token 数 × 词表大小的 logits）按次数切小：CPU 上它决定峰值内存，GPU 上它决定放不放得下。"""
    per_fwd = max(1, min(rows_per_step, micro_batch_tokens // max(1, width)))
    accum = -(-rows_per_step // per_fwd)
    return -(-rows_per_step // accum), accum


def eval_interval_measured(eval_s: float, step_s: float, max_fraction: float = 0.1) -> int:
    """按实测的一次评估秒数与一步训练秒数，评估开销 ≤ max_fraction 要隔几步（比按 token 数估更准：评估批次小、
    TRL 还顺手算熵和 token 准确率，实测每 token 并不比训练便宜多少）。"""
    return max(1, math.ceil(eval_s / (max_fraction * step_s)))


def budget_steps(step_s: float, minutes: float, eval_fraction: float = 0.1) -> int:
    """时间预算（分钟）内能跑几步：每步实测 step_s 秒，评估再占 eval_fraction。minutes <= 0 表示不限。"""
    if minutes <= 0:
        return 10**9
    return max(1, int(minutes * 60 / (step_s * (1 + eval_fraction))))


def step_timer(tokens_per_epoch: int, note: str = ""):
    """训练回调：第 1 步结束时按实测时间估计总时长（一行日志），并记下评估花了多少时间。

    tokens_per_epoch：训练集的真实 token 数（不含填充）；.tokens_per_s(epochs) = 训练过的真实 token / 训练墙钟时间。
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first_step_s = self.train_s = self.eval_s = 0.0
            self.t0 = self.t_step = self.t_end = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()
            if state.global_step == 1:
                self.first_step_s = self.t_end - self.t_step
                get_logger().info(f"{note}第 1 步实测 {self.first_step_s:.1f} 秒 -> 最多 {state.max_steps} 步，预计约 "
                                  f"{self.first_step_s * state.max_steps / 60:.1f} 分钟（不含评估；提前停止会更短）")

        def on_evaluate(self, args, state, control, **kw):
            self.eval_s += time.perf_counter() - self.t_end

        def on_train_end(self, args, state, control, **kw):
            self.train_s = time.perf_counter() - self.t0

        def tokens_per_s(self, epochs: float) -> float:
            return tokens_per_epoch * epochs / max(self.train_s - self.eval_s, 1e-9)

    return StepTimer()


def eval_schedule(steps: int, interval: int, round_steps: bool = True) -> tuple[int, int]:
    """-> (步数, 评估间隔)：至少每 interval 步才评估一次（开销 ≤ 10%，见 eval_interval / eval_interval_measured），
    且至少评估 2 次；round_steps 时步数取间隔的整数倍——load_best_model_at_end 只在评估点之间挑，最后一次评估之后
    多训的步会被白白丢掉。"""
    n = max(2, steps // max(1, interval))
    every = max(1, steps // n)
    return (every * n if round_steps and steps >= n else steps), every


def describe_budget(step_s: float, steps: int, planned: int, epochs: float, minutes: float, every: int) -> str:
    """一行中文：实测一步多久、预计总时长（含 ≤10% 的评估）、是否因 --max-train-minutes 减了步数。"""
    capped = (f"；{planned} 步要约 {planned * step_s * 1.1 / 60:.0f} 分钟，超过 --max-train-minutes {minutes:g}，"
              f"减到 {steps} 步 ≈ {epochs:.2f} 个 epoch（要训满：加大它或换 GPU）" if steps < planned else "")
    return (f"训练前实测一步 {step_s:.1f} 秒 -> {steps} 步预计约 {steps * step_s * 1.1 / 60:.1f} 分钟（含评估）{capped}"
            f"；每 {every} 步评估一次")


def lora_config(r: int, alpha: int, task: str = "CAUSAL_LM"):
    """r > 0 -> PEFT LoraConfig（所有线性层；task="SEQ_CLS" 时打分头 score 仍全参数训练）；r = 0 -> None（全参数）。"""
    if not r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type=task)


def with_lora(model: Any, r: int, alpha: int, task: str = "CAUSAL_LM") -> Any:
    """手写训练循环用：r > 0 时挂上 LoRA（原权重冻结），否则原样返回（全参数训练）。"""
    if not r:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(r, alpha, task))


def merge_lora(model: Any) -> Any:
    """LoRA 的增量 scale·B·A 合并进权重、去掉包装，返回普通模型（不是 LoRA 时原样返回）。"""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def trainable_params(model: Any) -> list:
    """requires_grad 的参数（LoRA 时只有 adapter 与 modules_to_save）：交给优化器的就是它们。"""
    return [p for p in model.parameters() if p.requires_grad]


def time_budget(minutes: float):
    """训练回调：训练墙钟（含评估）超过 minutes 分钟就在这一步停下，并在停之前评估 + 保存一次——
    配合 load_best_model_at_end，最后装回的仍是验证损失最低的那一步。minutes <= 0 表示不限。
    训练前按实测的一步估计步数（budget_steps）是主要手段；这是兜底：Trainer 的一步比单独实测的前向 + 反向
    多出优化器、指标和调度的开销，机器忙起来时也会变慢。"""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        hit = False

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if minutes > 0 and time.perf_counter() - self.t0 > minutes * 60 and state.global_step < state.max_steps:
                self.hit = True
                control.should_training_stop = control.should_evaluate = control.should_save = True
                get_logger().info(f"训练已用满 --max-train-minutes {minutes:g}：停在第 {state.global_step} 步"
                                  f"（计划 {state.max_steps} 步），先评估 + 保存这一步再从最好的一步收尾")

    return TimeBudget()


def optimizer_step(opt: Any, loss: Any, params: Any = None, max_norm: float = 1.0) -> float:
    """手写训练循环的一步：反向传播 +（给了 params 时）梯度裁剪 + 更新 + 清梯度；返回损失值。"""
    import torch

    loss.backward()
    if params is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad()
    return loss.item()


def launch(cmd: list[str], log_path: Any, result_path: Any, what: str = "多进程训练") -> dict:
    """以子进程运行一个多 rank 启动命令（torchrun / deepspeed），输出进日志文件；返回 rank 0 写的结果 JSON。

    每个 rank 只用 1 个线程（2 核上两个 rank 不互相抢），PYTHONPATH 指向本仓库，rank 里 import 的就是这份 common。
    """
    import json
    import os
    import subprocess
    from pathlib import Path

    from common.run import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path, result_path = Path(log_path), Path(result_path)
    with log_path.open("w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{what}失败（退出码 {proc.returncode}），日志 {log_path}：\n" + "\n".join(tail))
    return json.loads(result_path.read_text(encoding="utf-8"))
