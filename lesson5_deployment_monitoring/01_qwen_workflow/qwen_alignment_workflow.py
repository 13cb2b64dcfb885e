"""从数据到上线，一次跑完：数据接入 -> LoRA SFT -> DPO -> 评估闸门 -> 合并 -> 注册 MLflow -> 起聊天服务 -> API 冒烟。

每一步都是真的：TRL SFTTrainer / DPOTrainer（PEFT LoRA），闸门阈值来自 YAML（configs/lesson5/
qwen_alignment_workflow.yaml），不过闸门就不注册、不上线；过了就 merge_and_unload 存成普通 safetensors 模型、
在 MLflow 模型注册表（SQLite 后端，outputs/.../mlflow.db）里登记新版本并打上 champion 别名，然后用
common.serving 真的启动 OpenAI 兼容服务、用官方 openai 客户端问一句。

运行：
  python lesson5_deployment_monitoring/01_qwen_workflow/qwen_alignment_workflow.py           # CPU，smollm2-135m
  python lesson5_deployment_monitoring/01_qwen_workflow/qwen_alignment_workflow.py --smoke   # tiny-qwen2
  python lesson5_deployment_monitoring/01_qwen_workflow/qwen_alignment_workflow.py \\
      --model Qwen/Qwen2.5-7B-Instruct --source hf --config configs/lesson5/qwen_alignment_workflow_gpu.yaml  # GPU

你会看到：SFT 后留出对话的 eval_loss 比训练前低（LoRA 学到了对话格式与内容）；DPO 后留出偏好对上的
reward accuracy 与 margin 都比训练前高（策略相对参考模型更偏向 chosen）；闸门结论 gate_passed，过了闸门才有
注册的版本号 registered_version，以及上线后经 API 拿到的回答 served_answer（非空才算真的上线）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：6.0 分钟，6.2 GB，结论 4/4 成立
  ✓ LoRA SFT 降低留出对话的损失：训练后 / 训练前 eval_loss：0.6225（≤ 0.95）
  ✓ DPO 让留出偏好对的隐式奖励排对：reward accuracy 训练后 − 训练前：0.9792（≥ 0.6）
  ✓ DPO 拉开留出偏好对 chosen 与 rejected 的隐式奖励：margin 训练后 − 训练前：0.0881（> 0）
  ✓ 过了闸门的模型注册进 MLflow 并经 API 应答：闸门通过、有注册版本、回答非空，三者同时成立：1（≥ 1）
<!-- /results -->
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from common import cli, data, models, run, services, train


@dataclass
class Args(cli.CommonArgs):
    sft_steps: int = cli.arg(30, "SFT 步数", min=1)
    dpo_steps: int = cli.arg(20, "DPO 步数", min=1)
    learning_rate: float = cli.arg(5e-4, "SFT 学习率（LoRA）")
    dpo_learning_rate: float = cli.arg(5e-5, "DPO 学习率：比 SFT 小，DPO 只做偏好微调")
    beta: float = cli.arg(0.1, "DPO 的 beta：越大越贴近参考模型", min=0)
    per_device_train_batch_size: int = cli.arg(4, "每步几条样本", min=1)
    max_length: int = cli.arg(256, "每条样本最多多少 token", min=16)
    lora_r: int = cli.arg(8, "LoRA 秩", min=1)
    lora_alpha: int = cli.arg(16, "LoRA 缩放系数", min=1)
    preference_data: str = cli.arg(None, "偏好对（prompt/chosen/rejected）；默认 data/preference/pairs.jsonl")
    gate_min_sft_gain: float = cli.arg(0.0, "闸门：SFT 后 eval_loss 至少下降多少")
    gate_min_dpo_accuracy: float = cli.arg(0.5, "闸门：DPO 后留出偏好对的 reward accuracy 下限", min=0, max=1)
    registered_model: str = cli.arg("course-assistant", "MLflow 注册表里的模型名")
    max_tokens: int = cli.arg(48, "上线后冒烟请求生成多少 token", min=1)
    serve_threads: int = cli.arg(0, "聊天服务的 CPU 线程数（0 = 自动）", min=0)

    smoke_model = "tiny-qwen2"


# --smoke：极小模型用大学习率、少步数；DPO 步数够让留出偏好对的 accuracy 超过闸门；服务单线程（极小模型的
# 矩阵太小，多线程同步比并行省下的还多）
SMOKE = dict(sft_steps=12, dpo_steps=12, learning_rate=1e-2, dpo_learning_rate=5e-3, max_length=128,
             per_device_train_batch_size=8, max_tokens=16, serve_threads=1)
# 上线冒烟只问一句训练数据里有的问题：要确认的是"服务能答"，不是模型答得多好（那是闸门的事）
PROBE = "云帆 App 怎么修改绑定手机号？"

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测
CLAIMS = [
    # 冒烟门槛只要比值 ≤ 0.99：极小模型 12 步只降一点，要的是方向；默认模式 ≤ 0.95 才说明真学到了东西
    run.Claim("LoRA SFT 降低留出对话的损失：训练后 / 训练前 eval_loss", "sft_eval_loss_after / sft_eval_loss_before",
              "<=", 0.99, 0.95),
    # 训练前策略 = 参考模型，隐式奖励全为 0（accuracy 0、margin 0）：DPO 之后 chosen 的奖励才高过 rejected
    run.Claim("DPO 让留出偏好对的隐式奖励排对：reward accuracy 训练后 − 训练前",
              "dpo_reward_accuracy - dpo_reward_accuracy_before", ">=", 0.55, 0.6),
    run.Claim("DPO 拉开留出偏好对 chosen 与 rejected 的隐式奖励：margin 训练后 − 训练前",
              "dpo_reward_margin - dpo_reward_margin_before", ">", 0.1, 0.0),
    # 闸门不过就停：这一条在闸门未通过的运行里如实显示 ✗（没注册、没上线）
    run.Claim("过了闸门的模型注册进 MLflow 并经 API 应答：闸门通过、有注册版本、回答非空，三者同时成立",
              "gate_passed and registered_version >= 1 and len(served_answer.strip()) > 0", ">=", 1, 1),
]


def ingest(args: Args) -> dict:
    """数据接入：读入并校验（格式错误一行报错，点名文件和行），切出留出集。

    留出集在最前面切好、之后每一步都用同一份：SFT 与 DPO 的评估都不能见过训练样本，闸门才有意义。
    """
    # 按 --seed 确定性切分：同一种子每次切出同一份留出集，两次运行的 eval_loss 与闸门结论才能互相比较
    sft_train, sft_eval = data.split(data.load_sft(args.data or data.DATA_DIR / "sft" / "chat.jsonl"), 0.1, args.seed)
    pairs = data.load_preference(args.preference_data or data.DATA_DIR / "preference" / "pairs.jsonl")
    pref_train, pref_eval = data.split(pairs, 0.1, args.seed)
    return dict(sft_train=sft_train, sft_eval=sft_eval, pref_train=pref_train, pref_eval=pref_eval)


def lora(args: Args):
    """SFT 与 DPO 各训一个新 LoRA、训完就合并：DPO 的参考模型就是合并后的 SFT 模型，不必另存一份。"""
    from peft import LoraConfig

    # "all-linear"：PEFT 自己找出全部线性层（不含输出层），不必按架构写模块名，tiny-qwen2、smollm2、Qwen2.5 共用一份
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def sft(args: Args, out, model, tok, d: dict) -> tuple[object, dict]:  # noqa: ANN001
    """LoRA SFT（整段对话都算损失：SmolLM2 的对话模板没有 {% generation %} 标记，见下），合并后返回新模型。"""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = {k: Dataset.from_list([{"messages": c} for c in d[k]]) for k in ("sft_train", "sft_eval")}
    # save_strategy="no"：中间检查点对一条龙演示没用，合并后的模型才是要上线的产物
    # assistant_only_loss=False：它靠对话模板里的 {% generation %} 标记找助手回复，默认模型 SmolLM2 的模板没有
    # （第 1 课 01），开了就报错；completion_only_loss=None 让 TRL 按数据格式决定，对 messages 数据即不开。
    # 所以实际是整段对话都算损失。eval_strategy="no"：只在训练前后各量一次，训练中评估在 CPU 上白占时间
    # trainer_flags：只在 CUDA 上开 bf16/fp16；CPU 保留 fp32（bf16 的 8 位尾数会吞掉 LoRA 的小更新）
    cfg = SFTConfig(output_dir=str(out.path("sft")), max_steps=args.sft_steps, learning_rate=args.learning_rate,
                    per_device_train_batch_size=args.per_device_train_batch_size, max_length=args.max_length,
                    assistant_only_loss=False, completion_only_loss=None, logging_steps=5, save_strategy="no",
                    eval_strategy="no", report_to=out.trainer_report_to(), seed=args.seed,
                    **train.trainer_flags(model, log=False))
    t = SFTTrainer(model=model, args=cfg, train_dataset=ds["sft_train"], eval_dataset=ds["sft_eval"],
                   processing_class=tok, peft_config=lora(args))
    before = t.evaluate()["eval_loss"]   # 训练前先量：LoRA 的 B 初始化为 0，这就是原模型的损失
    t.train()
    after = t.evaluate()["eval_loss"]
    out.log.info(f"SFT eval_loss {before:.3f} -> {after:.3f}")
    m = {"sft_eval_loss_before": round(before, 4), "sft_eval_loss_after": round(after, 4)}
    # 合并后交出去的是普通模型：下一步 DPO 挂的新 LoRA 关掉时，参考模型就正好是这个 SFT 模型
    return t.model.merge_and_unload(), m


def dpo(args: Args, out, model, tok, d: dict) -> tuple[object, dict]:  # noqa: ANN001
    """在 SFT 模型上做 DPO（LoRA；参考模型 = 关掉 adapter 的同一个模型，不用再存一份）。"""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    def conv(p: dict) -> dict:   # 转成对话格式：TRL 会套 chat template，与上线时的提示一致
        return {"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]}

    # 默认学习率比 SFT 小一个量级：DPO 只在 SFT 模型附近挪动偏好，步子大了会把刚学会的回答格式一起改坏；
    # 评估批 16：评估只有前向、不存梯度和优化器状态，批可以比训练大，留出对一两批就量完
    cfg = DPOConfig(output_dir=str(out.path("dpo")), max_steps=args.dpo_steps, learning_rate=args.dpo_learning_rate,
                    beta=args.beta, per_device_train_batch_size=args.per_device_train_batch_size,
                    per_device_eval_batch_size=16, max_length=args.max_length, logging_steps=5, save_strategy="no",
                    eval_strategy="no", report_to=out.trainer_report_to(), seed=args.seed,
                    **train.trainer_flags(model, log=False))
    t = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list([conv(p) for p in d["pref_train"]]),
                   eval_dataset=Dataset.from_list([conv(p) for p in d["pref_eval"]]), processing_class=tok,
                   peft_config=lora(args))
    before = t.evaluate()   # 训练前：策略 = 参考模型，隐式奖励全为 0，这就是 DPO 要超过的基线
    t.train()
    ev = t.evaluate()   # reward accuracy：留出偏好对里 chosen 的隐式奖励高于 rejected 的比例
    # 键名 = TRL DPOTrainer 记的 rewards/* 指标加上 evaluate() 的 eval_ 前缀；TRL 改名时这里先报 KeyError，不会悄悄记错
    m = {"dpo_reward_accuracy_before": round(before["eval_rewards/accuracies"], 4),
         "dpo_reward_margin_before": round(before["eval_rewards/margins"], 4),
         "dpo_reward_accuracy": round(ev["eval_rewards/accuracies"], 4),
         "dpo_reward_margin": round(ev["eval_rewards/margins"], 4)}
    out.log.info(f"DPO 留出偏好对：reward accuracy {m['dpo_reward_accuracy']:.3f}，margin {m['dpo_reward_margin']:.3f}")
    return t.model.merge_and_unload(), m


def register(args: Args, out, merged_dir, metrics: dict) -> int:  # noqa: ANN001
    """登记到 MLflow 模型注册表（SQLite 后端，无需服务器；第 04 节用真实服务器），别名 champion 指向新版本。

    上线按别名（@champion）取模型而不是按版本号：回滚只需把别名指回旧版本，服务的配置不用改。
    """
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{out.path('mlflow.db')}"
    # 第二个参数是 registry_uri：不显式给时 MLflow 先看 MLFLOW_REGISTRY_URI 环境变量，版本可能被登记到别的库里
    client = MlflowClient(uri, uri)
    # artifact 位置写明在输出目录下：SQLite 后端默认用当前工作目录的 ./mlruns，换个目录运行模型文件就散落各处
    exp = client.get_experiment_by_name("lesson5-workflow") or \
        client.get_experiment(client.create_experiment("lesson5-workflow",
                                                       artifact_location=out.path("mlartifacts").as_uri()))
    r = client.create_run(exp.experiment_id, run_name="sft-dpo")
    for k, v in metrics.items():
        client.log_metric(r.info.run_id, k, float(v))
    client.log_artifacts(r.info.run_id, str(merged_dir), "model")
    client.set_terminated(r.info.run_id)
    # 名字已注册就复用：再跑一次是同一模型的新版本（版本号递增）；重复 create 会抛 RESOURCE_ALREADY_EXISTS
    if not client.search_registered_models(f"name='{args.registered_model}'"):
        client.create_registered_model(args.registered_model)
    # 来源写 runs:/<run_id>/model：版本指回产生它的那次运行，上面记的指标就是它上线的凭据
    mv = client.create_model_version(args.registered_model, f"runs:/{r.info.run_id}/model", run_id=r.info.run_id)
    client.set_registered_model_alias(args.registered_model, "champion", mv.version)
    mlflow.set_tracking_uri(uri)
    return int(mv.version)


def serve_and_ask(args: Args, out, merged_dir) -> str:  # noqa: ANN001
    """用 common.serving 起服务（合并后的目录就是普通模型），经官方 openai 客户端问一句。

    经真实的 HTTP 与官方客户端：模板、停止符、服务参数有任何一处不对，这里就会暴露，而不是在用户那里。
    """
    import openai

    # "{port}" 由 services.start 换成空闲端口：写死端口在 CI 上或同时跑两份时会撞车；
    # 服务名用注册名而不是目录路径：客户端按名字请求，模型换了版本调用方不用改
    cmd = [sys.executable, "-m", "common.serving", "--model", str(merged_dir), "--served-model-name",
           args.registered_model, "--port", "{port}", "--threads", str(args.serve_threads), "--device", args.device]
    # deadline 300 秒而不是默认的 60 秒：子进程要重新加载整个合并模型，忙碌的机器上慢得多；
    # PYTHONPATH 指向本仓库：子进程 import 的是这份 common，没有 pip install -e 也能起
    with services.start(cmd, log_file=out.path("server.log"), deadline_s=300,
                        env={"PYTHONPATH": str(run.REPO_ROOT)}) as svc:
        # max_retries=0：官方客户端默认会自动重试，冒烟要的是第一次就失败、把问题暴露出来
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key="not-needed", max_retries=0, timeout=300)
        r = client.chat.completions.create(model=args.registered_model, max_tokens=args.max_tokens,
                                           messages=[{"role": "user", "content": PROBE}])
    return r.choices[0].message.content


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数据接入：校验 + 切分
    d = ingest(args)
    out.log.info("数据：" + "，".join(f"{k} {len(v)}" for k, v in d.items()))
    # for_training=True：CPU 上保留 fp32 主权重（common.models.pick_dtype），bf16 会吞掉 AdamW 的小更新
    model, tok = models.load_args(args, for_training=True)

    # 2. LoRA SFT -> 合并：先教会回答的格式与内容，DPO 才有可比较的回答
    model, m_sft = sft(args, out, model, tok, d)
    # 3. DPO（在 SFT 模型上）-> 合并：在两个回答里偏向更好的那个，不需要单独的奖励模型
    model, m_dpo = dpo(args, out, model, tok, d)
    metrics = {**m_sft, **m_dpo, "sft_gain": round(m_sft["sft_eval_loss_before"] - m_sft["sft_eval_loss_after"], 4)}

    # 4. 评估闸门：阈值来自配置（谁改了阈值，git 里看得见）；不过闸门就停在这里，不注册、不上线
    checks = {"sft_gain": metrics["sft_gain"] >= args.gate_min_sft_gain,
              "dpo_reward_accuracy": metrics["dpo_reward_accuracy"] >= args.gate_min_dpo_accuracy}
    gate = all(checks.values())
    out.log.info(f"闸门 {'通过' if gate else '未通过'}：{checks}")
    if not gate:
        return out.finish({**metrics, "gate_passed": False, "gate_checks": checks, "registered_version": 0,
                           "served_answer": ""}, summary=f"闸门未通过 {checks}：不注册、不上线", claims=CLAIMS)

    # 5. 合并后的模型存成普通 safetensors 目录（部署不再需要 PEFT）
    merged_dir = out.path("merged")
    # safetensors 加载时不经 pickle、不执行代码；服务启动前的 models.check_dir 也只认 *.safetensors 权重
    model.save_pretrained(merged_dir, safe_serialization=True)
    # 分词器（连同对话模板）随模型存：服务只拿到这个目录，模板一变，线上提示就和训练时的格式不一致
    tok.save_pretrained(merged_dir)
    # 6. 注册到 MLflow，别名 champion
    version = register(args, out, merged_dir, metrics)
    out.log.info(f"MLflow 注册 {args.registered_model} 版本 {version}（@champion）")
    # 7. 上线：起聊天服务，经 API 冒烟
    answer = serve_and_ask(args, out, merged_dir)
    out.log.info(f"上线冒烟：{PROBE} -> {answer!r}")
    return out.finish({**metrics, "gate_passed": True, "gate_checks": checks, "registered_version": version,
                       "served_answer": answer},
                      summary=f"SFT eval_loss {m_sft['sft_eval_loss_before']:.3f}->"
                              f"{m_sft['sft_eval_loss_after']:.3f}，DPO acc {m_dpo['dpo_reward_accuracy']:.2f}，"
                              f"闸门通过，注册 v{version}，已上线并应答", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
