"""模型版本管理：真实的 MLflow 跟踪服务器 + 模型注册表（别名 champion / challenger、按别名加载、回滚），
同一次训练离线记到 W&B；跟踪服务器中途宕机，训练照样跑完，指标事后补传。

流程：用 common.services 启动 `mlflow server`（SQLite 后端 + 本地 artifact 目录，127.0.0.1 空闲端口；
或 --tracking-uri 用现成的）-> LoRA SFT（手写训练循环，每步记 loss）-> 训练到一半存 adapter 快照 v1、
结束时存 v2 -> 训练中途把服务器进程停掉（--outage kill：SIGTERM；freeze：SIGSTOP 挂起，请求超时），
记录失败的指标进本地缓冲（outbox.jsonl），训练不停 -> 服务器恢复后补传，核对 MLflow 里每一步都在 ->
两个快照作为 artifact 上传、注册成同一个模型的版本 1、2 -> v1 = champion、v2 = challenger ->
challenger 的 eval_loss 更低就晋升 -> 按别名 models:/name@champion 下载、装回基座，生成结果与内存里的
模型逐字相同 -> 回滚演练：champion 指回 v1，再加载核对 -> 同一次训练用 W&B 离线模式记录，adapter 作为 artifact。

运行：
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py           # CPU，smollm2-135m
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --smoke   # tiny-qwen2
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --tracking-uri http://127.0.0.1:5000
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson5/version_tracking_gpu.yaml                  # GPU
  打开 MLflow 界面：mlflow ui --backend-store-uri sqlite:///outputs/lesson5_deployment_monitoring/04_model_versioning/mlflow.db

你会看到：registered_versions=2，champion_version=2（challenger 的 eval_loss 更低），reload_matches=true
（按别名加载的生成结果与训练中的模型逐字相同，回滚后与 v1 相同），survived_tracking_outage=true
（服务器停机期间的步数全部补传）。实测数字见本目录 README.md。
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

from common import cli, data, models, run, services
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    tracking_uri: str = cli.arg(None, "现成的 MLflow 跟踪服务器；不填则本脚本启动一个（SQLite + 本地 artifact）")
    registered_model: str = cli.arg("course-support-lora", "注册表里的模型名")
    max_steps: int = cli.arg(30, "LoRA 训练步数（v1 快照取在一半处）", min=2)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率", min=0)
    per_device_train_batch_size: int = cli.arg(4, "每步几条样本", min=1)
    max_length: int = cli.arg(256, "每条样本最多多少 token", min=16)
    lora_r: int = cli.arg(8, "LoRA 秩", min=1)
    lora_alpha: int = cli.arg(16, "LoRA 缩放系数", min=1)
    outage: str = cli.arg("kill", "停机演练：kill（停掉服务器进程，训练后重启）/ freeze（SIGSTOP 挂起）/ none",
                          choices=["kill", "freeze", "none"])
    outage_fraction: float = cli.arg(0.3, "在训练进行到多少比例时停机", min=0, max=1)
    max_new_tokens: int = cli.arg(24, "核对输出时生成多少 token", min=1)
    use_wandb: bool = cli.arg(True, "同一次训练也记到 W&B（离线模式，不联网）")

    smoke_model = "tiny-qwen2"


# --smoke：极小模型承受得住大学习率，v1 与 v2 差别明显；停机用 freeze（SIGSTOP 让服务器进程停住、请求超时），
# 省掉一次 mlflow server 重启（忙碌的 2 核机上每次启动要 20-70 秒）；kill + 重启是默认模式
SMOKE = dict(max_steps=16, learning_rate=1e-2, max_length=128, max_new_tokens=12, outage="freeze")


class ResilientTracker:
    """包一层 MlflowClient：记录失败不抛异常，指标进本地缓冲（也落盘 outbox.jsonl），恢复后按原 step 补传。

    断路器：失败后 retry_after_s 秒内不再尝试（服务器挂起时每次请求都要等到超时，不能每步都等）。
    """

    def __init__(self, client, run_id: str, outbox, log, retry_after_s: float = 10.0):  # noqa: ANN001
        self.client, self.run_id, self.outbox, self.log = client, run_id, outbox, log
        self.pending: list[tuple[str, float, int]] = []
        self.failures, self.retry_after_s, self.open_until = 0, retry_after_s, 0.0

    def _send(self) -> bool:
        from mlflow.entities import Metric

        if time.monotonic() < self.open_until:
            return False
        try:
            for i in range(0, len(self.pending), 1000):   # log_batch 一次最多 1000 条
                chunk = self.pending[i:i + 1000]
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, int(time.time() * 1000), s)
                                                            for k, v, s in chunk])
            self.pending = []
            return True
        except Exception as e:  # noqa: BLE001 —— 跟踪是旁路：它挂了，训练不能跟着挂
            self.failures += 1
            self.open_until = time.monotonic() + self.retry_after_s
            if self.failures == 1:
                self.log.warning(f"MLflow 不可用（{type(e).__name__}）：指标先写进 {self.outbox.name}，训练继续")
            return False

    def metric(self, key: str, value: float, step: int) -> None:
        self.pending.append((key, float(value), step))
        if not self._send():
            with open(self.outbox, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value, "step": step}) + "\n")

    def flush(self) -> int:
        """服务器回来后补传缓冲（不等断路器）；返回补传条数。"""
        n, self.open_until = len(self.pending), 0.0
        return n if self._send() else 0


def start_mlflow(out, port: int | None = None) -> services.Service:  # noqa: ANN001
    """mlflow server：SQLite 存元数据，--artifacts-destination 存文件（经服务器代理上传下载）。"""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out.path('mlflow.db')}",
           "--artifacts-destination", str(out.path("mlartifacts")), "--host", "127.0.0.1", "--port", "{port}",
           "--workers", "1"]
    return services.start(cmd, ready_path="/health", log_file=out.path("mlflow_server.log"), deadline_s=300,
                          port=port)


def batches(tok, convs: list[list[dict]], bs: int, max_length: int, seed: int):
    """无限循环地产出 (input_ids, labels, attention_mask) 批；labels 只保留助手回复。"""
    import random

    import torch

    rows = [data.tokenize_chat(tok, c, max_length) for c in convs]
    rows = [r for r in rows if any(x != -100 for x in r["labels"])]
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - bs + 1, bs):
            b = rows[i:i + bs]
            n = max(len(r["input_ids"]) for r in b)
            pad = tok.pad_token_id
            yield (torch.tensor([r["input_ids"] + [pad] * (n - len(r["input_ids"])) for r in b]),
                   torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in b]),
                   torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in b]))


def eval_loss(model, tok, convs: list[list[dict]], max_length: int) -> float:  # noqa: ANN001
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=x, labels=y, attention_mask=m).loss.item()
                  for x, y, m in [next(batches(tok, [c], 1, max_length, 0)) for c in convs]]
    model.train()
    return sum(losses) / len(losses)


def answers(model, tok, convs: list[list[dict]], n: int) -> list[str]:  # noqa: ANN001
    return models.generate(model, tok, [data.prompt_text(tok, c) for c in convs], n)


def main(args: Args) -> dict:
    import mlflow
    import torch
    from mlflow import MlflowClient
    from peft import LoraConfig, PeftModel, get_peft_model

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    # 1. 跟踪服务器：自己启动一个真的 mlflow server，或用 --tracking-uri
    svc = None if args.tracking_uri else start_mlflow(out)
    uri = args.tracking_uri or svc.url
    try:   # 先用一个快请求确认服务器在：MLflow 客户端默认重试 7 次、退避几分钟才报错
        import httpx

        httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise UserError(f"--tracking-uri {uri}: 连不上 MLflow 跟踪服务器（{type(e).__name__}）") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    try:
        exp = client.get_experiment_by_name("lesson5-versioning") or \
            client.get_experiment(client.create_experiment("lesson5-versioning"))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--tracking-uri {uri}: 连不上 MLflow（{str(e).splitlines()[0][:200]}）") from None
    mrun = client.create_run(exp.experiment_id, run_name=f"lora-{out.model_name}")
    rid = mrun.info.run_id
    for k, v in {"model": out.model_name, "lr": args.learning_rate, "steps": args.max_steps, "lora_r": args.lora_r,
                 "batch_size": args.per_device_train_batch_size}.items():
        client.log_param(rid, k, v)
    tracker = ResilientTracker(client, rid, out.path("outbox.jsonl"), out.log)
    out.path("outbox.jsonl").unlink(missing_ok=True)
    wb = None
    if args.use_wandb:
        import wandb

        wb = wandb.init(project="llm-course-lesson5", mode="offline", dir=str(out.dir), config=vars(args).copy(),
                        name=f"lora-{out.model_name}")

    # 2. 数据与模型：客服对话 SFT，留出几条算 eval_loss、核对生成
    train_convs, held = data.split(data.load_sft(args.data or data.DATA_DIR / "sft" / "chat.jsonl"), 0.1, args.seed)
    probe = held[:4]
    model, tok = models.load_args(args, for_training=True)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    # 3. 训练；中途停掉跟踪服务器，训练照常进行。训练中的跟踪请求要快速失败：默认重试 7 次、指数退避，
    #    停机时每一步都会卡几分钟
    fast_fail = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    saved_env = {k: os.environ.get(k) for k in fast_fail}
    os.environ.update(fast_fail)
    outage_step = max(1, int(args.max_steps * args.outage_fraction)) if svc and args.outage != "none" else -1
    snap, it, losses = {}, batches(tok, train_convs, args.per_device_train_batch_size, args.max_length, args.seed), []
    for step in range(1, args.max_steps + 1):
        if step == outage_step:
            out.log.info(f"第 {step} 步：停机演练（{args.outage}）——MLflow 服务器进程 pid {svc.proc.pid}")
            if args.outage == "kill":
                svc.stop()
            else:
                os.killpg(svc.proc.pid, signal.SIGSTOP)
        x, y, m = next(it)
        loss = model(input_ids=x, labels=y, attention_mask=m).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        tracker.metric("train_loss", loss.item(), step)
        if wb:
            wb.log({"train_loss": loss.item()}, step=step)
        if step in (args.max_steps // 2, args.max_steps):   # 两个快照：v1（一半）、v2（结束）
            tag = "v1" if step < args.max_steps else "v2"
            model.save_pretrained(out.path(f"adapter_{tag}"))
            snap[tag] = {"eval_loss": eval_loss(model, tok, held, args.max_length),
                         "answers": answers(model, tok, probe, args.max_new_tokens), "step": step}
            tracker.metric("eval_loss", snap[tag]["eval_loss"], step)
    for k, v in saved_env.items():   # 恢复默认的重试：注册、上传这些操作要可靠而不是快
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    out.log.info(f"训练完成 {args.max_steps} 步：loss {losses[0]:.3f} -> {losses[-1]:.3f}；"
                 f"记录失败 {tracker.failures} 次，缓冲 {len(tracker.pending)} 条")

    # 4. 服务器恢复（同一个 SQLite、同一个端口），补传缓冲，核对每一步都在
    if outage_step > 0:
        if args.outage == "kill":
            svc = start_mlflow(out, port=svc.port)
        else:
            os.killpg(svc.proc.pid, signal.SIGCONT)
    buffered = sum(1 for _ in open(out.path("outbox.jsonl"), encoding="utf-8")) if out.path("outbox.jsonl").exists() else 0
    replayed = tracker.flush()
    history = client.get_metric_history(rid, "train_loss")
    survived = len({h.step for h in history}) == args.max_steps and not tracker.pending
    out.log.info(f"补传 {replayed} 条；MLflow 里 train_loss 有 {len(history)} 步（应为 {args.max_steps}）")

    # 5. 上传两个快照、注册为版本 1、2，设别名
    name = args.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name, description="课程第 5 课：客服 LoRA adapter")
    versions = {}
    for tag in ("v1", "v2"):
        client.log_artifacts(rid, str(out.path(f"adapter_{tag}")), f"adapter_{tag}")
        mv = client.create_model_version(name, f"runs:/{rid}/adapter_{tag}", run_id=rid,
                                         tags={"eval_loss": f"{snap[tag]['eval_loss']:.4f}", "base_model": out.model_name})
        versions[tag] = int(mv.version)
    client.set_terminated(rid)
    client.set_registered_model_alias(name, "champion", versions["v1"])
    client.set_registered_model_alias(name, "challenger", versions["v2"])
    # 晋升规则：challenger 的留出损失更低才上位
    if snap["v2"]["eval_loss"] < snap["v1"]["eval_loss"]:
        client.set_registered_model_alias(name, "champion", versions["v2"])
    champion = int(client.get_model_version_by_alias(name, "champion").version)
    out.log.info(f"注册版本 {versions}；eval_loss v1 {snap['v1']['eval_loss']:.3f} / v2 {snap['v2']['eval_loss']:.3f}"
                 f" -> champion = v{champion}")

    # 6. 按别名加载：下载 adapter、装回新加载的基座，生成结果必须与训练时逐字相同
    def load_alias(alias: str) -> list[str]:
        path = mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(out.path(f"dl_{alias}")))
        base, _ = models.load_args(args, for_training=True)
        return answers(PeftModel.from_pretrained(base, path), tok, probe, args.max_new_tokens)

    champ_tag = "v2" if champion == versions["v2"] else "v1"
    reload_ok = load_alias("champion") == snap[champ_tag]["answers"]
    # 回滚演练：champion 指回另一个版本，加载核对，再恢复
    other = "v1" if champ_tag == "v2" else "v2"
    client.set_registered_model_alias(name, "champion", versions[other])
    rollback_ok = load_alias("champion") == snap[other]["answers"]
    client.set_registered_model_alias(name, "champion", versions[champ_tag])
    out.log.info(f"按别名加载与训练时一致：{reload_ok}；回滚到 {other} 后一致：{rollback_ok}")

    # 7. W&B 离线：同样的指标 + adapter artifact（wandb sync 可事后上传）
    if wb:
        import wandb

        art = wandb.Artifact(f"adapter-{out.model_name.replace('/', '-')}", type="model")
        art.add_dir(str(out.path("adapter_v2")))
        wb.log_artifact(art)
        wb.summary.update({"eval_loss_v1": snap["v1"]["eval_loss"], "eval_loss_v2": snap["v2"]["eval_loss"]})
        wb.finish()
    if svc:
        svc.stop()
    return out.finish({
        "registered_versions": len(versions), "champion_version": champion, "reload_matches": reload_ok,
        "rollback_matches": rollback_ok, "survived_tracking_outage": survived if outage_step > 0 else "not_tested",
        "outage_failed_logs": tracker.failures, "outage_buffered_metrics": buffered,
        "v1_v2_answers_differ": snap["v1"]["answers"] != snap["v2"]["answers"], "metric_steps_in_mlflow": len(history),
        "eval_loss_v1": round(snap["v1"]["eval_loss"], 4), "eval_loss_v2": round(snap["v2"]["eval_loss"], 4),
        "train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
        "wandb_dir": str(wb.dir) if wb else None, "tracking_uri": uri},
        summary=f"注册 {len(versions)} 个版本，champion=v{champion}，别名加载一致={reload_ok}，回滚一致={rollback_ok}，"
                f"停机 {tracker.failures} 次记录失败后补传完整={survived}")


if __name__ == "__main__":
    main(cli.parse(Args))
