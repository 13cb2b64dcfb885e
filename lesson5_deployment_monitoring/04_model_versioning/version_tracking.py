"""模型版本管理：真实的 MLflow 跟踪服务器 + 模型注册表（别名 champion / challenger、按别名加载、回滚），
同一次训练离线记到 W&B；跟踪服务器中途宕机，训练照样跑完，指标事后补传。

流程：启动 `mlflow server`（SQLite + 本地 artifact，空闲端口；或 --tracking-uri 用现成的）-> 手写 LoRA 训练循环，
一半时存 adapter 快照 v1、结束时存 v2 -> 中途停掉服务器（--outage kill：SIGTERM；freeze：SIGSTOP，请求超时），
失败的记录进本地缓冲 outbox.jsonl，训练不停 -> 服务器恢复后补传、核对每一步都在 -> 两个快照注册成两个新版本
（第一次运行是 1、2；注册表里已有版本时接着往后编号），v1 = champion、v2 = challenger，eval_loss 更低的上位
-> 按别名 models:/name@champion 下载装回基座，生成与训练时逐字相同 -> 回滚演练 -> 同一次训练也用 W&B 离线模式记录。

运行：
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py           # CPU，smollm2-135m
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --smoke   # tiny-qwen2
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --tracking-uri http://127.0.0.1:5000
  python lesson5_deployment_monitoring/04_model_versioning/version_tracking.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson5/version_tracking_gpu.yaml                  # GPU
  mlflow ui --backend-store-uri sqlite:///outputs/lesson5_deployment_monitoring/04_model_versioning/mlflow.db  # 界面

你会看到：registered_versions=2；champion 的 eval_loss 低于训练前（LoRA 训练有效）；晋升后 @champion 指向
eval_loss 更低的版本（通常是训练更久的 v2，即原来的 challenger），从服务器读回核对；reload_matches=true
（按别名加载的生成结果与训练中的模型逐字相同，回滚后与另一版本相同，且两版本回答不同），survived_tracking_outage=true
（服务器停机期间的步数全部补传；没有停机演练时没有这个键）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：2.6 分钟，4.5 GB，结论 4/4 成立
  ✓ LoRA 训练降低留出损失：champion 的 eval_loss / 训练前：0.8384（≤ 0.95）
  ✓ 晋升规则：注册表里 @champion 指向留出损失更低的版本（从服务器读回）：1（≥ 1）
  ✓ 按别名加载的模型与训练时逐字相同、回滚后与另一版本逐字相同（两版本回答不同）：1（≥ 1）
  ✓ 跟踪服务器停机（指标进了缓冲）训练照常跑完、恢复后每一步都补传：MLflow 里的步数 / 训练步数：1（≥ 1）
<!-- /results -->
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

from common import cli, data, lm, models, run, services
from common.errors import UserError, brief

# 跟踪旁路（断路器 + 落盘 + 补传）与训练期间的快速失败设置，在旁边的 _tracker.py
_tracker = run.import_sibling(__file__, "_tracker")


@dataclass
class Args(cli.CommonArgs):
    tracking_uri: str = cli.arg(None, "现成的 MLflow 跟踪服务器；不填则本脚本启动一个（SQLite + 本地 artifact）")
    registered_model: str = cli.arg("course-support-lora", "注册表里的模型名")
    max_steps: int = cli.arg(30, "LoRA 训练步数（v1 快照取在一半处）", min=2)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率")
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

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测
CLAIMS = [
    # 冒烟：极小模型 16 步只降一点（实测 5.89 -> 5.81，比值 0.986），要的是方向，不是幅度
    run.Claim("LoRA 训练降低留出损失：champion 的 eval_loss / 训练前",
              "min(eval_loss_v1, eval_loss_v2) / eval_loss_before", "<=", 0.995, 0.95),
    run.Claim("晋升规则：注册表里 @champion 指向留出损失更低的版本（从服务器读回）",
              "champion_version == (v2_version if eval_loss_v2 < eval_loss_v1 else v1_version)", ">=", 1, 1),
    # 两个版本的回答不同，"加载后一致"才不是平凡成立
    run.Claim("按别名加载的模型与训练时逐字相同、回滚后与另一版本逐字相同（两版本回答不同）",
              "reload_matches and rollback_matches and v1_v2_answers_differ", ">=", 1, 1),
    # 没演练停机（--outage none、现成的服务器）时这一条是 0：没发生的停机不算扛住了
    run.Claim("跟踪服务器停机（指标进了缓冲）训练照常跑完、恢复后每一步都补传：MLflow 里的步数 / 训练步数",
              "metric_steps_in_mlflow / steps_trained if outage_buffered_metrics > 0 else 0", ">=", 1, 1),
]


def start_mlflow(out, port: int | None = None):  # noqa: ANN001
    """mlflow server：SQLite 存元数据，--artifacts-destination 存文件（经服务器代理上传下载）。

    经服务器代理 artifact：客户端不需要直接访问存储（S3、NFS……）的权限，和团队共用服务器时一样；
    --workers 1：SQLite 不适合多个进程同时写，一个 worker 对课程的流量足够。
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out.path('mlflow.db')}",
           "--artifacts-destination", str(out.path("mlartifacts")), "--host", "127.0.0.1", "--port", "{port}",
           "--workers", "1"]
    return services.start(cmd, ready_path="/health", log_file=out.path("mlflow_server.log"), deadline_s=300,
                          port=port)


def connect(args: Args, out):  # noqa: ANN001
    """启动（或连上）跟踪服务器，建实验和一次运行；返回 (服务或 None, uri, client, run_id)。"""
    import httpx
    from mlflow import MlflowClient

    svc = None if args.tracking_uri else start_mlflow(out)
    uri = args.tracking_uri or svc.url
    try:   # 先用一个快请求确认服务器在：MLflow 客户端默认重试 7 次、退避几分钟才报错
        httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise UserError(f"--tracking-uri {uri}: 连不上 MLflow 跟踪服务器（{type(e).__name__}）") from None
    client = MlflowClient(uri, uri)
    try:
        exp = client.get_experiment_by_name("lesson5-versioning") or \
            client.get_experiment(client.create_experiment("lesson5-versioning"))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--tracking-uri {uri}: 连不上 MLflow（{brief(e, 200)}）") from None
    rid = client.create_run(exp.experiment_id, run_name=f"lora-{out.model_name}").info.run_id
    # 超参数记在运行上：半年后看注册表里的某个版本，还能查到它是怎么训出来的
    for k, v in {"model": out.model_name, "lr": args.learning_rate, "steps": args.max_steps, "lora_r": args.lora_r,
                 "batch_size": args.per_device_train_batch_size}.items():
        client.log_param(rid, k, v)
    return svc, uri, client, rid


def batches(tok, convs: list[list[dict]], bs: int, max_length: int, seed: int):  # noqa: ANN001
    """无限循环地产出右填充的批（input_ids / attention_mask / labels）；labels 只保留助手回复。"""
    import random

    rows = [data.tokenize_chat(tok, c, max_length) for c in convs]
    rows = [r for r in rows if any(x != -100 for x in r["labels"])]   # 没有助手 token 的样本损失是 0/0
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for i in range(0, len(rows) - bs + 1, bs):   # 丢掉凑不满的尾巴：每步的批大小一样，loss 曲线可比
            yield lm.pad_right(rows[i:i + bs], tok.pad_token_id)


def eval_loss(model, tok, convs: list[list[dict]], max_length: int) -> float:  # noqa: ANN001
    """留出对话逐条算损失再平均：v1、v2 用同一把尺子，晋升规则才公平。"""
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(**next(batches(tok, [c], 1, max_length, 0))).loss.item() for c in convs]
    model.train()
    return sum(losses) / len(losses)


def answers(model, tok, convs: list[list[dict]], n: int) -> list[str]:  # noqa: ANN001
    """贪心生成：同一个模型每次回答逐字相同，所以"按别名加载后回答一致"才能当作加载正确的证据。"""
    return models.generate(model, tok, [data.prompt_text(tok, c) for c in convs], n)


def train(args: Args, out, model, tok, convs: dict, tracker, wb, svc, outage_step: int):  # noqa: ANN001
    """手写 LoRA 训练循环；outage_step 那一步停掉（或冻住）服务器。返回 (快照 v1/v2, 每步 loss)。"""
    import torch

    # 只把 LoRA 参数交给优化器：冻结的基座权重不需要动量缓冲，省下两倍于模型的内存
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    # 训练前先量一次：LoRA 的 B 初始化为 0，这就是基座模型的留出损失，两个快照都要跟它比
    snap, losses = {"before": {"eval_loss": eval_loss(model, tok, convs["held"], args.max_length)}}, []
    it = batches(tok, convs["train"], args.per_device_train_batch_size, args.max_length, args.seed)
    for step in range(1, args.max_steps + 1):
        if step == outage_step:
            out.log.info(f"第 {step} 步：停机演练（{args.outage}）——MLflow 服务器进程 pid {svc.proc.pid}")
            if args.outage == "kill":
                svc.stop()
            else:   # SIGSTOP：进程还在、端口还开着，请求只是等到超时——比进程消失更难对付的故障
                os.killpg(svc.proc.pid, signal.SIGSTOP)
        # 训练不知道服务器挂了：tracker.metric 失败时只进缓冲，下一行照常反向传播
        loss = model(**next(it)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        tracker.metric("train_loss", loss.item(), step)
        if wb:
            wb.log({"train_loss": loss.item()}, step=step)
        if step in (args.max_steps // 2, args.max_steps):   # 两个快照：v1（一半）、v2（结束）
            tag = "v1" if step < args.max_steps else "v2"
            model.save_pretrained(out.path(f"adapter_{tag}"))   # 只存 LoRA 增量（几百 KB），注册表里版本才轻
            snap[tag] = {"eval_loss": eval_loss(model, tok, convs["held"], args.max_length),
                         "answers": answers(model, tok, convs["probe"], args.max_new_tokens), "step": step}
            tracker.metric("eval_loss", snap[tag]["eval_loss"], step)
    return snap, losses


def register(args: Args, out, client, rid: str, snap: dict) -> tuple[dict, int]:  # noqa: ANN001
    """两个快照上传、注册成同一模型的两个新版本；v1=champion、v2=challenger，留出损失更低的上位。"""
    name = args.registered_model
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name, description="课程第 5 课：客服 LoRA adapter")
    versions = {}
    for tag in ("v1", "v2"):
        client.log_artifacts(rid, str(out.path(f"adapter_{tag}")), f"adapter_{tag}")
        tags = {"eval_loss": f"{snap[tag]['eval_loss']:.4f}", "base_model": out.model_name}
        versions[tag] = int(client.create_model_version(name, f"runs:/{rid}/adapter_{tag}", run_id=rid,
                                                        tags=tags).version)
    client.set_terminated(rid)
    client.set_registered_model_alias(name, "champion", versions["v1"])
    client.set_registered_model_alias(name, "challenger", versions["v2"])
    # 晋升规则：challenger 的留出损失更低才上位（别名一改，按 @champion 加载的线上服务就换了版本）
    if snap["v2"]["eval_loss"] < snap["v1"]["eval_loss"]:
        client.set_registered_model_alias(name, "champion", versions["v2"])
    return versions, int(client.get_model_version_by_alias(name, "champion").version)


def load_alias(args: Args, out, tok, probe: list, alias: str) -> list[str]:  # noqa: ANN001
    """按别名下载 adapter、装回新加载的基座，生成核对用的回答（线上服务就是这样按别名取模型的）。"""
    import mlflow
    from peft import PeftModel

    uri = f"models:/{args.registered_model}@{alias}"
    path = mlflow.artifacts.download_artifacts(uri, dst_path=str(out.path(f"dl_{alias}")))
    base, _ = models.load_args(args, for_training=True)
    return answers(PeftModel.from_pretrained(base, path), tok, probe, args.max_new_tokens)


def check_reload(args: Args, out, client, tok, probe: list, versions: dict, champion: int, snap: dict):  # noqa: ANN001
    """champion 加载后与训练时逐字相同；回滚演练：champion 指回另一个版本，加载核对，再恢复。"""
    name = args.registered_model
    champ_tag = "v2" if champion == versions["v2"] else "v1"
    other = "v1" if champ_tag == "v2" else "v2"
    reload_ok = load_alias(args, out, tok, probe, "champion") == snap[champ_tag]["answers"]
    client.set_registered_model_alias(name, "champion", versions[other])
    rollback_ok = load_alias(args, out, tok, probe, "champion") == snap[other]["answers"]
    client.set_registered_model_alias(name, "champion", versions[champ_tag])
    out.log.info(f"按别名加载与训练时一致：{reload_ok}；回滚到 {other} 后一致：{rollback_ok}")
    return reload_ok, rollback_ok


def log_wandb(wb, out, snap: dict) -> None:  # noqa: ANN001
    """W&B 离线：同样的指标 + adapter artifact（wandb sync 可事后上传）。"""
    import wandb

    art = wandb.Artifact(f"adapter-{out.model_name.replace('/', '-')}", type="model")
    art.add_dir(str(out.path("adapter_v2")))
    wb.log_artifact(art)
    wb.summary.update({"eval_loss_v1": snap["v1"]["eval_loss"], "eval_loss_v2": snap["v2"]["eval_loss"]})
    wb.finish()


def open_wandb(args: Args, out):  # noqa: ANN001
    """W&B 离线模式：不联网、不要账号，记录留在输出目录里，之后 wandb sync 可上传。"""
    if not args.use_wandb:
        return None
    import wandb

    return wandb.init(project="llm-course-lesson5", mode="offline", dir=str(out.dir), config=vars(args).copy(),
                      name=f"lora-{out.model_name}")


def recover(args: Args, out, svc, tracker, client, rid: str, outage: bool) -> dict:  # noqa: ANN001
    """服务器恢复（同一 SQLite、同一端口）后补传缓冲、核对每一步都在；没演练停机也补传：网络抖动同样会进缓冲。"""
    if outage and args.outage == "kill":
        svc = start_mlflow(out, port=svc.port)   # 同一端口：客户端手里的 uri 不用改
    elif outage:
        os.killpg(svc.proc.pid, signal.SIGCONT)
    outbox = out.path("outbox.jsonl")
    buffered = len(outbox.read_text(encoding="utf-8").splitlines()) if outbox.exists() else 0
    replayed = tracker.flush()
    # 数不同的 step 而不是记录条数：请求超时但服务器其实收到了时，补传会再记一次（至少一次送达）
    steps = len({h.step for h in client.get_metric_history(rid, "train_loss")})
    out.log.info(f"补传 {replayed} 条；MLflow 里 train_loss 有 {steps} 步（应为 {args.max_steps}）")
    survived = steps == args.max_steps and not tracker.pending
    return {"svc": svc, "buffered": buffered, "steps": steps, "survived": survived}


def main(args: Args) -> dict:
    import mlflow
    from peft import LoraConfig, get_peft_model

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 1. 数据与模型：客服对话 SFT，留出几条算 eval_loss、核对生成（留出集不参与训练，晋升比较才不偏向过拟合）。
    #    先于跟踪服务器：坏的 --data / --model 一行报错，不必先等 mlflow server 启动（忙碌的机器上要几十秒）
    train_convs, held = data.split(data.load_sft(args.data or data.DATA_DIR / "sft" / "chat.jsonl"), 0.1, args.seed)
    convs = {"train": train_convs, "held": held, "probe": held[:4]}
    model, tok = models.load_args(args, for_training=True)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    # 2. 跟踪服务器：自己启动一个真的 mlflow server，或用 --tracking-uri；同一次训练也记到 W&B（离线）
    svc, uri, client, rid = connect(args, out)
    # 全局 URI 给不经 client 的调用用：load_alias 里 mlflow.artifacts.download_artifacts 按 models:/ 别名下载
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    tracker = _tracker.ResilientTracker(client, rid, out.path("outbox.jsonl"), out.log)
    out.path("outbox.jsonl").unlink(missing_ok=True)   # 上一次运行留下的缓冲不属于这次的 run_id
    wb = open_wandb(args, out)

    # 3. 训练；中途停掉跟踪服务器，训练照常进行（跟踪是旁路，不该成为训练的单点故障）
    # 只停自己起的服务器（svc 不为 None）：--tracking-uri 指向的是别人的服务，不能拿来做停机演练
    outage_step = max(1, int(args.max_steps * args.outage_fraction)) if svc and args.outage != "none" else -1
    with _tracker.fast_fail():
        snap, losses = train(args, out, model, tok, convs, tracker, wb, svc, outage_step)
    out.log.info(f"训练完成 {args.max_steps} 步：loss {losses[0]:.3f} -> {losses[-1]:.3f}；"
                 f"记录失败 {tracker.failures} 次，缓冲 {len(tracker.pending)} 条")

    # 4. 服务器恢复，补传缓冲，核对每一步都在
    rec = recover(args, out, svc, tracker, client, rid, outage=outage_step > 0)
    svc = rec["svc"]
    # 没演练停机就不声称"扛住了"：结果里干脆没有这个键，而不是放一个不是布尔值的占位
    outage = {"survived_tracking_outage": rec["survived"]} if outage_step > 0 else {}

    # 5. 上传两个快照、注册成两个新版本，设别名；6. 按别名加载核对、回滚演练
    # 版本号由注册表发：再跑一次（或 --tracking-uri 指向团队的服务器）是 3、4……，结论按本次注册的版本号判
    versions, champion = register(args, out, client, rid, snap)
    out.log.info(f"注册版本 {versions}；eval_loss v1 {snap['v1']['eval_loss']:.3f} / v2 {snap['v2']['eval_loss']:.3f}"
                 f" -> champion = v{champion}")
    reload_ok, rollback_ok = check_reload(args, out, client, tok, convs["probe"], versions, champion, snap)

    # 7. W&B 离线收尾（同样的指标 + adapter artifact）；停掉自己起的服务器
    if wb:
        log_wandb(wb, out, snap)
    if svc:
        svc.stop()
    return out.finish({
        "registered_versions": len(versions), "v1_version": versions["v1"], "v2_version": versions["v2"],
        "champion_version": champion, "reload_matches": reload_ok,
        "rollback_matches": rollback_ok, **outage, "outage_failed_logs": tracker.failures,
        "outage_buffered_metrics": rec["buffered"], "metric_steps_in_mlflow": rec["steps"],
        "v1_v2_answers_differ": snap["v1"]["answers"] != snap["v2"]["answers"],
        "eval_loss_before": round(snap["before"]["eval_loss"], 4), "eval_loss_v1": round(snap["v1"]["eval_loss"], 4),
        "eval_loss_v2": round(snap["v2"]["eval_loss"], 4), "steps_trained": len(losses),
        "train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
        "wandb_dir": str(wb.dir) if wb else None, "tracking_uri": uri},
        summary=f"注册 {len(versions)} 个版本，champion=v{champion}，别名加载一致={reload_ok}，回滚一致={rollback_ok}，"
                f"停机 {tracker.failures} 次记录失败后补传完整={outage.get('survived_tracking_outage', '未演练')}",
        claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
