"""第 7 课 02 的分步计时：LangChain 回调按 run_id 记下 检索 / 提示词 / 模型 / 解析 每一步的耗时，再汇总成 p50/p95。"""
from __future__ import annotations

import time


class StepTimer:
    """回调处理器：按 run_id 记录每一步的开始/结束，得到 检索 / 提示词 / 模型 / 解析 各自的耗时。"""

    def __new__(cls):
        # langchain_core 在用到时才导入（--help 与坏参数要在一秒内返回），所以基类只能在这里拿到
        from langchain_core.callbacks import BaseCallbackHandler

        class _Timer(BaseCallbackHandler):
            def __init__(self):
                self.t0, self.ms = {}, {}

            def _start(self, run_id, step):
                # 按 run_id 配对而不是按步骤名：同一步可能嵌套（EnsembleRetriever 里套着两个检索器），按名字配对会串台
                self.t0[run_id] = (step, time.perf_counter())

            def _end(self, run_id):
                # 所有 Runnable 的结束都走 on_chain_end，没有 _start 过的胶水步骤也会来：查不到 run_id 就忽略
                if run_id in self.t0:
                    step, t = self.t0.pop(run_id)
                    self.ms.setdefault(step, []).append((time.perf_counter() - t) * 1000)

            def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kw):
                # EnsembleRetriever 里的 BM25 与 FAISS 也各发一次 retriever 事件：只计外层那一次，否则检索算了三遍
                if parent_run_id is None or kw.get("name") == "EnsembleRetriever" or "Ensemble" in str(serialized):
                    self._start(run_id, "retrieve")

            def on_retriever_end(self, documents, *, run_id, **kw):
                self._end(run_id)

            # 聊天模型开始时发 chat_model_start，结束却走 on_llm_end：LangChain 回调就是这样不对称，两个都要接
            def on_chat_model_start(self, serialized, messages, *, run_id, **kw):
                self._start(run_id, "llm")

            def on_llm_end(self, response, *, run_id, **kw):
                self._end(run_id)

            def on_chain_start(self, serialized, inputs, *, run_id, **kw):
                # 链里每个 Runnable 都是一个 chain 事件；只挑提示词模板与解析器这两步，其余是胶水
                name = kw.get("name") or ""
                if name in ("ChatPromptTemplate", "parse_citations"):
                    self._start(run_id, "prompt" if name == "ChatPromptTemplate" else "parse")

            def on_chain_end(self, outputs, *, run_id, **kw):
                self._end(run_id)

            on_prompt_end = on_chain_end
        # __new__ 返回的不是 StepTimer 的实例，Python 就不再调 StepTimer.__init__：调用方拿到的就是真正的回调处理器
        return _Timer()


def step_stats(step_ms: dict) -> dict:
    """每步 p50 / p95 / 最快一次：最快那次最不受机器忙闲影响，比较两步谁慢看它。"""
    import numpy as np

    # 冒烟只有 4 题：np.percentile 线性插值下 p95 几乎就是最大值，这时比快慢要看 min_ms
    return {s: {"p50_ms": round(float(np.percentile(v, 50)), 2), "p95_ms": round(float(np.percentile(v, 95)), 2),
                "min_ms": round(min(v), 2), "calls": len(v)} for s, v in step_ms.items()}
