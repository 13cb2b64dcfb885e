"""训练的公共机械：按设备选 TrainingArguments 开关（bf16 / use_cpu / 梯度检查点），以及测峰值内存。"""
from __future__ import annotations

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


def peak_rss_mb() -> float:
    """本进程从启动到现在的最大常驻内存（MB；Linux ru_maxrss 以 KB 计）。"""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024
