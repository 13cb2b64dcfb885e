"""第 5 课 04 的跟踪旁路：MLflow 服务器停机时训练不停，指标先进缓冲、恢复后按原 step 补传。

只属于 version_tracking.py（run.import_sibling 加载）；单独成文件，是因为它是一个完整的小机制：
断路器 + 本地落盘 + 补传，读懂它不需要看训练循环。
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager


class ResilientTracker:
    """包一层 MlflowClient：记录失败不抛异常，指标进本地缓冲（也落盘 outbox.jsonl），恢复后按原 step 补传。

    断路器：失败后 retry_after_s 秒内不再尝试（服务器挂起时每次请求都要等到超时，不能每步都等）。
    """

    def __init__(self, client, run_id: str, outbox, log, retry_after_s: float = 10.0):  # noqa: ANN001
        self.client, self.run_id, self.outbox, self.log = client, run_id, outbox, log
        # (key, value, step)：补传时按原 step 记，MLflow 里的曲线与没停机时一样，不会全挤在恢复那一步
        self.pending: list[tuple[str, float, int]] = []
        self.failures, self.retry_after_s, self.open_until = 0, retry_after_s, 0.0

    def _send(self) -> bool:
        from mlflow.entities import Metric

        # 用 monotonic 而不是 time.time：系统时间被校准、回拨时，冷却期不会被拉长或跳过
        if time.monotonic() < self.open_until:
            return False
        try:
            for i in range(0, len(self.pending), 1000):   # log_batch 一次最多 1000 条
                chunk = self.pending[i:i + 1000]
                # timestamp 是发送时的毫秒墙钟（MLflow 的单位）；step 保留原值，补传的点落回原来的位置
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, int(time.time() * 1000), s)
                                                            for k, v, s in chunk])
            # 全部块都发出去才清空：中途失败时前面的块下次会重发（至少一次送达），所以核对时数不同的 step
            self.pending = []
            return True
        except Exception as e:  # noqa: BLE001 —— 跟踪是旁路：它挂了，训练不能跟着挂
            self.failures += 1
            self.open_until = time.monotonic() + self.retry_after_s
            # 只在第一次失败时警告：停机期间每步都打一行，训练日志就被淹没了
            if self.failures == 1:
                self.log.warning(f"MLflow 不可用（{type(e).__name__}）：指标先写进 {self.outbox.name}，训练继续")
            return False

    def metric(self, key: str, value: float, step: int) -> None:
        """记一条指标；发不出去就落盘：进程这时崩了，outbox.jsonl 里也还有这些步。"""
        self.pending.append((key, float(value), step))
        if not self._send():
            # 追加、一条一行 JSON：进程在写到一半时被杀，最多坏最后一行，前面的记录都还读得出
            with open(self.outbox, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value, "step": step}) + "\n")

    def flush(self) -> int:
        """服务器回来后补传缓冲（不等断路器）；返回补传条数。"""
        n, self.open_until = len(self.pending), 0.0
        return n if self._send() else 0


@contextmanager
def fast_fail():
    """训练中的跟踪请求快速失败：MLflow 默认重试 7 次、指数退避，停机时每一步都会卡几分钟。

    退出时恢复原值：之后的注册、上传要的是可靠，而不是快。
    """
    # 不重试、2 秒超时：freeze 演练时服务器不回应，每步最多多等 2 秒，之后断路器冷却期里一个请求都不发
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        # 原来没设的要删掉而不是设成空串：MLflow 会把空串当成整数去转换，之后每个请求都报 ValueError
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
