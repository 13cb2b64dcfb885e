"""训练的公共机械：按设备选 Trainer 开关、测峰值内存、LoRA、多 rank 启动，以及用自己的数据训练的那一套。

学生把 --data 指向自己的文件时，每个 Trainer 脚本（第 1 课 05、2 课 02、3 课 06、4 课 03/04、5 课 02）做同样的事：
训练前一行长度报告（length_report），SFT 打包（pack / PackedCollator），评估开销 ≤ 10%（eval_schedule），
按 eval_loss 留最好的一步（best_step_args / kept_step），第 1 步后的预计用时与时间预算（attach）。
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from common import data
from common.errors import UserError
from common.run import REPO_ROOT, get_logger


def device_of(model: Any):
    """模型参数所在的设备。"""
    return next(model.parameters()).device


def trainer_flags(model: Any, gradient_checkpointing: bool = False, log: bool = True) -> dict:
    """TrainingArguments / SFTConfig / DPOConfig 的设备开关。
    bf16 混合精度只在支持它的 CUDA 上开（CPU 保留 fp32：bf16 的 8 位尾数会吞掉小更新）；梯度检查点在任何设备上
    都按用户的意思开：它用重算换激活内存，CPU 上同样省内存（慢约 20-30%）。"""
    import torch

    on_gpu = device_of(model).type == "cuda"
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    flags = dict(bf16=bf16, fp16=on_gpu and not bf16, use_cpu=not on_gpu, dataloader_pin_memory=on_gpu,
                 activation_checkpointing=gradient_checkpointing)   # transformers 5 的名字：旧名 v6 删除
    if gradient_checkpointing:   # 非重入实现：和 LoRA/冻结参数一起用时梯度也能正确回传
        flags["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if log:
        get_logger().info(("CUDA 训练：" + ("bf16 混合精度" if bf16 else "fp16 混合精度")) if on_gpu else
                          "CPU 训练：fp32（不开混合精度）" + ("，梯度检查点开" if gradient_checkpointing else ""))
    return flags


class PeakMemory:
    """with PeakMemory(device) as m: ...；之后 m.peak_mb = 执行期间比开始时多用的峰值内存（MB），m.peak_abs_mb = 峰值。
    CUDA：max_memory_allocated（精确）；CPU：后台线程每 2 ms 采一次进程 RSS（含库的缓存，只宜比较同一进程的两段）。"""

    def __init__(self, device: Any = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = self.peak_abs_mb = 0.0

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.002):
            self._max = max(self._max, proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if _KEEP_FREED["on"]:   # 冒烟留着的空闲堆先还给系统：块内分配若复用已驻留的页，RSS 不涨，峰值会量成 0
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # 只还页，不改调用方（release_memory）设的阈值
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._max = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, psutil.Process().memory_info().rss)
        self.peak_abs_mb, self.peak_mb = peak / 2**20, (peak - self._start) / 2**20
        if _KEEP_FREED["on"]:   # 量完：冒烟回到留着堆的快模式
            keep_freed_memory()


_KEEP_FREED = {"on": False}   # 冒烟运行（run.start）打开：释放的堆留着给下一步复用


def _mallopt(mmap_bytes: int, trim_bytes: int = 0) -> Any:
    """设 glibc 的 M_MMAP_THRESHOLD（最多 32 MB）与 M_TRIM_THRESHOLD；返回 libc，非 glibc 平台返回 None。"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt(-3, mmap_bytes)
    if trim_bytes:
        libc.mallopt(-1, trim_bytes)
    return libc


def keep_freed_memory() -> None:
    """冒烟：释放的堆留在进程里复用。极小模型每步分配又释放同样大的张量（15 万词表的 logits），glibc 默认大块单独
    mmap、用完即还，下次要重新缺页清零。实测 make test 的 sys 时间 295 -> 73 秒，第 5 课 05 冒烟 44 -> 35 秒。"""
    _KEEP_FREED["on"] = _mallopt(32 << 20, 1 << 30) is not None


def release_memory() -> None:
    """gc + 把空闲堆还给系统（malloc_trim），且让 64 KB 以上的分配用完即还、堆顶空出 128 KB（glibc 默认）就还：
    下一段代码的峰值不叠在上一段上。"""
    gc.collect()
    if libc := _mallopt(1 << 16, 128 << 10):
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """本进程从启动到现在的最大常驻内存（MB；Linux 的 ru_maxrss 以 KB 计，macOS 以字节计）。"""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ---- 用自己的数据训练：长度、打包、评估间隔、时间预算、按验证损失留最好的一步 ----------------------------------

def length_report(records: list, max_length: int, policy: str = "truncate", knob: str = "--max-length",
                  drop_flag: str | None = "--over-length drop") -> dict:
    """已编码未截断的样本 -> 长度统计，并打一行：几条超长、会怎样、怎么改（knob 调长度，drop_flag 改成丢弃）。
    偏好数据每条传 [chosen, rejected]，任一条超长就算整对超长；截掉的尾部恰是回答结尾，模型学不会收尾。"""
    groups = [r if isinstance(r, list) else [r] for r in records]
    lens = sorted(max(len(s["input_ids"]) for s in g) for g in groups)
    over = [g for g in groups if max(len(s["input_ids"]) for s in g) > max_length]
    cut = sum(sum(x != -100 for x in s["labels"][max_length:]) for g in over for s in g)
    total = sum(sum(x != -100 for x in s["labels"]) for g in groups for s in g)
    stats = {"records": len(groups), "tokens_mean": round(sum(lens) / max(1, len(lens)), 1),
             "tokens_p90": lens[min(len(lens) - 1, int(len(lens) * 0.9))] if lens else 0,
             "tokens_max": lens[-1] if lens else 0, "over_max_length": len(over),
             "answer_tokens_cut": int(cut), "answer_tokens": int(total)}
    unit = "对" if any(isinstance(r, list) for r in records) else "条"
    bigger = min(4096, 1 << max(0, stats["tokens_max"] - 1).bit_length())   # 装得下最长一条的 2 的幂
    line = (f"训练数据 {len(groups)} {unit}；token 平均 {stats['tokens_mean']:.0f} / p90 {stats['tokens_p90']} / "
            f"最大 {stats['tokens_max']}；超过 {knob} {max_length} 的 {len(over)} {unit}")
    if not over:
        line += "（没有被截断的）"
    elif policy == "drop":
        line += f"：整{unit}丢弃（占 {len(over) / len(groups):.0%}）；要保留请调大 {knob} {bigger}"
    else:
        line += (f"：截断，丢掉回答结尾 {cut} 个 token（占回答 token 的 {cut / max(1, total):.0%}）；要保留请调大 "
                 f"{knob} {bigger}" + (f"，或 {drop_flag} 丢掉这些样本" if drop_flag else ""))
    get_logger().info(line)
    return stats


def truncate(rows: list[dict], max_length: int, policy: str = "truncate") -> list[dict]:
    """超长样本截到 max_length（policy="drop"：整条丢掉）；只剩提示、没有回答 token 的样本去掉。"""
    if policy == "drop":
        rows = [r for r in rows if len(r["input_ids"]) <= max_length]
    rows = [{"input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]} for r in rows]
    return [r for r in rows if any(x != -100 for x in r["labels"])]


def encode_pairs(tok: Any, pairs: list[dict]) -> list[list[dict]]:
    """偏好对（TRL 对话格式）-> 每对 [chosen, rejected] 两条未截断的编码（提示 labels = -100），交给 length_report。"""
    return [[data.tokenize_chat(tok, list(p["prompt"]) + list(p[k]), 10**9) for k in ("chosen", "rejected")]
            for p in pairs]


def pack(rows: list[dict], max_length: int):
    """样本按 Best-Fit-Decreasing 装进长度 ≤ max_length 的行（TRL 的 pack_dataset）；每行记下各段长度
    seq_lengths，PackedCollator 据此给出每段从 0 开始的 position_ids：模型靠它区分段落边界。"""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return pack_dataset(ds, max_length, strategy="bfd")


class PackedCollator:
    """打包后的行 -> 批：input_ids / labels / position_ids，不给 attention_mask。
    没有 attention_mask、position_ids 在段落边界处归零时，transformers 自己识别"打包序列"：sdpa / eager（CPU 也一样）
    构造块对角的因果掩码，flash-attention 用 position_ids 算 cu_seqlens 走变长核；每段只看得见自己，与逐条算等价。
    前提是模型不建 KV 缓存（model.config.use_cache = False，否则整行被当成一段，悄悄算错）。每段第一个 token 的
    label 置 -100：移位后它由上一段的最后一个 token "预测"，那不是要学的东西。行尾补的 pad 各自成段、不算损失。"""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids, labels, pos = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            p = [i for L in e.get("seq_lengths", [n]) for i in range(L)]
            ids.append(list(e["input_ids"]) + [self.pad] * (width - n))
            labels.append([-100 if q == 0 else x for x, q in zip(e["labels"], p)] + [-100] * (width - n))
            pos.append(p + [0] * (width - n))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def micro_batches(rows_per_step: int, width: int, micro_batch_tokens: int) -> tuple[int, int]:
    """一步看 rows_per_step 行（每行 ≤ width token），一次前向最多 micro_batch_tokens 个 token -> (每次前向几行,
    梯度累积几次)。累积不改变一步的梯度，只把激活内存（尤其是 token 数 × 词表大小的 logits）按次数切小。"""
    per_fwd = max(1, min(rows_per_step, micro_batch_tokens // max(1, width)))
    accum = -(-rows_per_step // per_fwd)
    return -(-rows_per_step // accum), accum


def eval_schedule(steps: int, eval_tokens: int = 0, step_tokens: int = 1, interval: int = 0,
                  round_steps: bool = False) -> tuple[int, int]:
    """-> (步数, 评估间隔)：评估开销 ≤ 10%（评估只有前向，≈ 同样 token 训练的 1/3；给了实测的 interval 就用它），
    且至少评估 2 次——只评估一次就无从"挑"。round_steps：步数取间隔的整数倍，load_best_model_at_end 只在
    评估点之间挑，最后一次评估之后多训的步会被白白丢掉。"""
    interval = interval or math.ceil(eval_tokens / (3 * max(1, step_tokens) * 0.1))
    n = max(2, steps // max(1, interval))
    every = max(1, steps // n)
    return (every * n if round_steps and steps >= n else steps), every


def best_step_args(every: int) -> dict:
    """TrainingArguments 的键：每 every 步评估并保存（只存模型，留最好的 + 最新的 2 份），结束时装回 eval_loss
    最低的一步。数据少、训得久时验证损失先降后升，最后一步往往已经在死记训练集。

    prediction_loss_only：评估只要损失（准确率等由 TRL 在 compute_loss 里记）。不开时 Trainer 把每批
    batch × 长度 × 词表（smollm2 49k）的 logits 收集、补齐、拼接起来——20 条 600 token 的留出集就是 2.4 GB，
    评估比训练还慢（issue 24 实测 57 vs 270 token/s）。"""
    return dict(eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
                save_only_model=True, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                prediction_loss_only=True)


def eta_line(step_s: float, steps: int, minutes: float = 0.0, when: str = "第 1 步实测") -> str:
    """一行中文：实测一步多久 -> 全部步数预计多久；超过时间预算时说大约停在第几步。"""
    line = (f"{when} {step_s:.1f} 秒 -> 最多 {steps} 步，预计约 {step_s * steps / 60:.1f} 分钟"
            f"（不含评估；提前停止会更短）")
    if minutes > 0 and step_s * steps > minutes * 60:
        line += (f"；超过 --max-train-minutes {minutes:g}：约在第 {max(1, int(minutes * 60 / step_s))} 步停下"
                 f"（停前先评估 + 保存，仍留验证损失最低的一步）")
    return line


def attach(trainer: Any, minutes: float = 0.0, patience: int = 0, tokens: int = 0) -> Any:
    """给 Trainer 挂上计时器并返回它（.first_step_s / .train_s / .eval_s / .evals / .hit / .tokens_per_s(epochs)）：
    - 第 1 步后按实测时间说预计总时长：长数据一步可能要几十秒，开训一分钟内就该知道要等多久；
    - 时间预算 minutes（0 = 不限）：训练墙钟（含评估）超过就停，停前先评估 + 保存，仍从评估过的步里挑最好的；
    - patience > 0：连续 patience 次评估没有改善就提前停（EarlyStoppingCallback）。
    训练中的评估后还原评估前的随机数状态：否则之后的 dropout 掩码整体错位，评估几次训出的模型就不一样。
    tokens：一个 epoch 的真实 token 数（算吞吐用）；.evals：训练中评估了几次（× 验证集 token / .eval_s = 评估吞吐）。"""
    import torch
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Clock(TrainerCallback):
        hit, first_step_s, train_s, eval_s, evals, rng = False, 0.0, 0.0, 0.0, 0, None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.t_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()
            self.rng = (torch.random.get_rng_state(), torch.cuda.is_available() and torch.cuda.get_rng_state_all())
            if state.global_step == 1:
                self.first_step_s = self.t_end - self.t_step
                get_logger().info(eta_line(self.first_step_s, state.max_steps, minutes))
            if minutes > 0 and self.t_end - self.t0 > minutes * 60 and state.global_step < state.max_steps:
                self.hit = control.should_training_stop = control.should_evaluate = control.should_save = True
                get_logger().info(f"训练已用满 --max-train-minutes {minutes:g}：停在第 {state.global_step} 步"
                                  f"（计划 {state.max_steps} 步），先评估 + 保存这一步再从最好的一步收尾")

        def on_evaluate(self, args, state, control, **kw):
            if self.rng:   # 训练中的评估（训练前后单独调用的 evaluate 不算）：计时，并还原随机数状态
                self.eval_s, self.evals = self.eval_s + time.perf_counter() - self.t_end, self.evals + 1
                torch.random.set_rng_state(self.rng[0])
                if self.rng[1]:
                    torch.cuda.set_rng_state_all(self.rng[1])
                self.rng = None

        def on_train_end(self, args, state, control, **kw):
            self.train_s, self.rng = time.perf_counter() - self.t0, None

        def tokens_per_s(self, epochs: float) -> float:
            return tokens * epochs / max(self.train_s - self.eval_s, 1e-9)

    trainer.add_callback(clock := Clock())
    if patience:
        trainer.add_callback(EarlyStoppingCallback(patience))
    return clock


def kept_step(trainer: Any) -> dict:
    """训练结束后读回：保留的是第几步（load_best_model_at_end 装回的检查点；没有 = 最后一步）、训练到第几步、
    训练中每次评估的 eval_loss、是提前停（连续没改善）还是用满了时间预算。"""
    st = trainer.state
    hit = any(getattr(c, "hit", False) for c in trainer.callback_handler.callbacks)
    # 训练后再 evaluate() 也记在最后一步上：倒着读，同一步留最早的那次
    history = {h["step"]: round(h["eval_loss"], 4) for h in reversed(st.log_history) if "eval_loss" in h and h["step"]}
    best = st.best_model_checkpoint
    return {"kept_step": int(Path(best).name.split("-")[-1]) if best else st.global_step, "steps": st.global_step,
            "eval_history": [[s, v] for s, v in sorted(history.items())], "time_budget_hit": hit,
            "stopped_early": st.global_step < st.max_steps and not hit}


def kept_metrics(trainer: Any) -> dict:
    """保留那一步在训练中评估时记下的指标（与 evaluate() 同样的键）：load_best_model_at_end 装回的就是它，不必再完整
    评估一遍（issue 24）。那一步没评估过（没开评估、恢复的旧状态里没有）才真的 evaluate()。"""
    st = [h for h in trainer.state.log_history if h.get("step") == kept_step(trainer)["kept_step"] and "eval_loss" in h]
    return {k: v for k, v in st[0].items() if k.startswith("eval_") or k == "epoch"} if st else trainer.evaluate()


def lora_config(r: int, alpha: int, task: str = "CAUSAL_LM"):
    """r > 0 -> PEFT LoraConfig（所有线性层；task="SEQ_CLS" 时打分头 score 仍全参数训练）；r = 0 -> None（全参数）。"""
    if not r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type=task)


def merge_lora(model: Any) -> Any:
    """LoRA 的增量 scale·B·A 合并进权重、去掉包装，返回普通模型（不是 LoRA 时原样返回）。"""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def trainable_params(model: Any) -> list:
    """requires_grad 的参数（LoRA 时只有 adapter 与 modules_to_save）：交给优化器的就是它们。"""
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(opt: Any, loss: Any, params: Any = None, max_norm: float = 1.0) -> float:
    """手写训练循环的一步：反向传播 +（给了 params 时）梯度裁剪 + 更新 + 清梯度；返回损失值。"""
    import torch

    loss.backward()
    if params is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad()
    return loss.item()


def ds_init(on_gpu: bool) -> None:
    """rank 里初始化进程组：GPU 用 NCCL；CPU 用 gloo，不 JIT 编译 DeepSpeed 的共享内存算子（新机器要编 2 分钟）。"""
    import deepspeed.ops
    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def ds_exit() -> None:
    """结果已写、barrier 已过：直接退出，不走 C++ 析构（CI 见过析构时 abort：terminate called without ...）。"""
    import torch.distributed as dist
    dist.destroy_process_group(), sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def launch(cmd: list[str], log_path: Any, result_path: Any) -> dict:
    """以子进程运行多 rank 启动命令（torchrun / deepspeed），输出进日志文件；返回 rank 0 写的结果 JSON。
    每个 rank 只用 1 个线程（2 核上两个 rank 不互相抢），PYTHONPATH 指向本仓库，rank 里 import 的就是这份 common。"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path, result_path = Path(log_path), Path(result_path)
    with log_path.open("w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"多进程训练失败（退出码 {proc.returncode}），日志 {log_path}：\n" + "\n".join(tail))
    return json.loads(result_path.read_text(encoding="utf-8"))


# DeepSpeed 认识、但不在 runtime.constants 里的顶层配置节（各由子模块解析）：少了它们，合法配置会被误报为未知键
_DS_SECTIONS = {"zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb",
                "csv_monitor", "comms_logger", "aio", "autotuning", "elasticity", "checkpoint", "data_efficiency",
                "compression_training", "nebula", "monitor_config"}


def validate_ds_config(cfg: dict, world_size: int, where: str = "ds_config") -> None:
    """交给 DeepSpeed 自己的解析器按目标卡数校验：各节的 pydantic 模型拒绝未知键，batch 断言按 world_size 检查。
    顶层未知键 DeepSpeed 只会默默忽略——那正是"配了却没生效"的来源，所以这里先拒绝。"""
    from unittest import mock

    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime import constants

    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | _DS_SECTIONS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"{where}: DeepSpeed 不认识的顶层键 {unknown}")
    # 解析器从进程组读卡数；这里没有进程组，就告诉它目标集群有几张卡
    with mock.patch.object(ds_config.dist, "get_world_size", return_value=world_size), \
            mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        try:
            ds_config.DeepSpeedConfig(json.loads(json.dumps(cfg)))
        except (AssertionError, ValueError) as e:   # pydantic ValidationError 是 ValueError 的子类
            raise UserError(f"{where}: DeepSpeed 拒绝了这份配置：{' '.join(str(e).split())[:300]}") from None
