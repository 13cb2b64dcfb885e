"""按 Hugging Face 平台的方式跑 DPO：TrlParser 读 YAML 配方、accelerate 启动配置、生成模型卡、--push 上传 Hub。

与 TRL 官方 `trl/scripts/dpo.py`、alignment-handbook 同一套结构：配方 configs/lesson5/recipes/dpo_hf.yaml 一份 YAML
同时填 ScriptArguments（数据）、DPOConfig（训练）、ModelConfig（模型与 LoRA），由 `trl.TrlParser` 解析；
硬件写在 accelerate 配置 configs/lesson5/recipes/accelerate_single.yaml；训练完 trainer.save_model 写出
Hub 仓库的目录（adapter + 分词器），再用 huggingface_hub 的 ModelCard / ModelCardData 生成 README.md（YAML 元数据
+ 数据、训练配方、指标表、预期用途与局限）。--push 时 HfApi.create_repo + upload_folder 推到 hub_model_id；
离线（HF_HUB_OFFLINE=1，课程默认）则只写好仓库目录并说明怎样推送。

运行：
  python lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py            # CPU，smollm2-135m，配方里的 40 步
  python lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py --smoke    # tiny-qwen2，几步
  accelerate launch --config_file configs/lesson5/recipes/accelerate_single.yaml \\
      lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py --model Qwen/Qwen2.5-7B-Instruct --source hf --push  # GPU

--data my_pairs.jsonl 换掉配方里的数据集：训练前一行说清几对超过配方的 max_length（TRL 截掉回答结尾），第 1 步后报
预计用时，超过 --max-train-minutes 先评估 + 保存再停，按留出损失留最好的一步（配方里的 eval/save 策略由脚本接管）。

你会看到：DPO 训练后留出偏好对的 DPO 损失低于训练前（训练前策略 = 参考模型，损失恰为 log 2），rewards/margins
由 0 变正、reward accuracy 上升（策略学会了比参考模型更偏向 chosen）；repo/README.md 模型卡（含指标表）；
离线时 push_status=offline。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：12.2 分钟，13.6 GB（超过 10 分钟、超过 8 GB），结论 3/3 成立
  ✓ DPO 降低留出偏好对的损失：训练后 / 训练前（策略 = 参考模型时为 log 2）：0.6816（≤ 0.95）
  ✓ DPO 让留出偏好对的隐式奖励排对：reward accuracy 训练后 − 训练前：0.9167（≥ 0.6）
  ✓ DPO 拉开留出偏好对 chosen 与 rejected 的隐式奖励：margin 训练后 − 训练前：0.9217（> 0）
<!-- /results -->
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run, train
from common.errors import UserError, brief

# 配方的默认路径按仓库根目录算，不按当前目录：脚本从任何目录运行都找得到
RECIPES = run.REPO_ROOT / "configs" / "lesson5" / "recipes"
_recipe = run.import_sibling(__file__, "_recipe")   # 这一课独有的配方检查：加载模型之前把坏配方一行拒绝


@dataclass
class Args(cli.CommonArgs):
    recipe: str = cli.arg(str(RECIPES / "dpo_hf.yaml"),
                          "TRL 配方 YAML（ScriptArguments + DPOConfig + ModelConfig 的字段）")
    accelerate_config: str = cli.arg(str(RECIPES / "accelerate_single.yaml"), "accelerate 启动配置（写进模型卡）")
    data: str = cli.arg(None, "偏好对 JSONL {prompt, chosen, rejected}（字符串或消息列表，见 data/README.md）；"
                              "给了就代替配方里的 dataset_name")
    max_steps: int = cli.arg(0, "覆盖配方里的 max_steps（0 = 用配方的）", min=0)
    learning_rate: float = cli.arg(0.0, "覆盖配方里的学习率（0 = 用配方的）", min=0)
    push: bool = cli.arg(False, "训练完推到 Hub 的 hub_model_id（需联网与 HF_TOKEN；离线时只写目录）")
    hub_model_id: str = cli.arg(None, "覆盖配方里的 hub_model_id")
    eval_steps: int = cli.arg(0, "每多少步在留出对上评估并保存一次；0 = 自动（评估开销 ≤ 训练的 1/10，至少 2 次）",
                             min=0)
    max_train_minutes: float = cli.arg(10.0, "训练时间预算（分钟，含评估）：超时先评估 + 保存再停；0 = 不限", min=0)

    smoke_model = "tiny-qwen2"


# --smoke：极小模型承受大学习率；12 步足以让 rewards/margins 明显为正
SMOKE = dict(max_steps=12, learning_rate=5e-3)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测（训练前策略 = 参考模型）
CLAIMS = [
    # 训练前策略 = 参考模型，每对的隐式奖励差为 0，损失 −log σ(0) = log 2：比值 < 1 才说明策略开始偏向 chosen
    run.Claim("DPO 降低留出偏好对的损失：训练后 / 训练前（策略 = 参考模型时为 log 2）", "eval_loss / eval_loss_before",
              "<=", 0.9, 0.95),
    run.Claim("DPO 让留出偏好对的隐式奖励排对：reward accuracy 训练后 − 训练前",
              "eval_reward_accuracy - eval_reward_accuracy_before", ">=", 0.5, 0.6),
    run.Claim("DPO 拉开留出偏好对 chosen 与 rejected 的隐式奖励：margin 训练后 − 训练前",
              "eval_reward_margin - eval_reward_margin_before", ">", 0.2, 0.0),
]


def parse_recipe(args: Args, model_path: str, output_dir: Path, flags: dict):
    """TrlParser：默认值 < 配方 YAML < 这里给的覆盖项（就像在命令行上追加 --max_steps 12）。
    覆盖项走同一条解析路径（而不是解析完再改属性）：TrainingArguments 在解析时才检查各项是否相容。"""
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    over = ["--model_name_or_path", model_path, "--output_dir", str(output_dir)]
    for k, v in flags.items():
        over += [f"--{k}", str(v).lower()]
    if args.max_steps:
        over += ["--max_steps", str(args.max_steps)]
    if args.learning_rate:
        over += ["--learning_rate", str(args.learning_rate)]
    # 覆盖项只追加在 --config 之后：TrlParser 里命令行参数优先于 YAML，配方文件本身一个字不改
    err = io.StringIO()   # argparse 报错前先把整段 usage 打到 stderr：收起来，只取最后一行放进一行错误里
    try:
        with contextlib.redirect_stderr(err):
            return TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(
                args=["--config", args.recipe, *over])
    # argparse 出错走 sys.exit(2)（SystemExit）；TrainingArguments 在 __post_init__ 里发现不相容的组合抛
    # ValueError：两种都换成点名配方的一行 UserError，而不是一整段 usage 或 traceback
    except (SystemExit, ValueError, TypeError) as e:
        why = (err.getvalue().strip().splitlines() or str(e).splitlines() or [repr(e)])[-1]
        raise UserError(f"--recipe {args.recipe}: 配方里有 TRL 不认识或不合法的字段（{why[:300]}）") from None


def load_pairs(args: Args, out, script_args, local: Path | None):  # noqa: ANN001
    """datasets 加载：本地 JSONL 用 "json" 构建器（hub 数据集名则直接 load_dataset）；去掉 chosen == rejected 的对，
    转成对话格式并切出测试集。"""
    from datasets import load_dataset

    name = args.data or script_args.dataset_name
    if local:   # 已按课程格式逐行校验过（_recipe.check）
        # 本地文件没有预先分好的 split，datasets 把它整个放进 "train"；下面再自己切留出对
        ds = load_dataset("json", data_files=str(local), split="train")
    else:
        try:
            ds = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
        except Exception as e:  # noqa: BLE001 - 离线、名字写错、没有这个 split：一行点名配方的键
            raise UserError(f"{args.recipe}: 键 dataset_name {name}: 加载失败（{type(e).__name__}: {brief(e)}）") \
                from None
    # 第 4 课 06 的规则 1：chosen 与 rejected 规范化后相同的对没有偏好信号（DPO 梯度为 0、准确率必记错）
    n = len(ds)
    ds = ds.filter(lambda p: data.norm_text(p["chosen"]) != data.norm_text(p["rejected"]))
    # 少于 2 对就切不出训练与留出两份：与其在 train_test_split 里崩，不如说清是去重去掉的
    if len(ds) < n and len(ds) < 2:
        raise UserError(f"{name}: {n - len(ds)} 对的 chosen 与 rejected 相同（规范化后），没有偏好信号；"
                        f"去掉后只剩 {len(ds)} 对，无法训练")
    if len(ds) < n:
        out.log.info(f"{name}: 去掉 {n - len(ds)} 对 chosen 与 rejected 相同（规范化后）的偏好对：没有偏好信号")
    # 对话格式：TRL 按模型自己的对话模板拼 prompt 与回答（与训练后部署时一样）
    ds = ds.map(lambda p: {"prompt": [{"role": "user", "content": p["prompt"]}],
                           "chosen": [{"role": "assistant", "content": p["chosen"]}],
                           "rejected": [{"role": "assistant", "content": p["rejected"]}]})
    # 切分种子写死为 42、不随 --seed：换种子只改训练的随机性，留出对不变，不同种子的指标才能放在一起比
    return ds.train_test_split(test_size=0.1, seed=42), name


def model_card(args: Args, out, repo: Path, base: str, dataset: str, tcfg, metrics: dict) -> Path:  # noqa: ANN001
    """huggingface_hub 的 ModelCardData（YAML 元数据）+ 正文：数据、配方、指标、预期用途与局限。"""
    from huggingface_hub import ModelCard, ModelCardData

    # library_name="peft" + base_model：仓库里只有 adapter，Hub 据此把它挂到基座模型下、给出用 PEFT 加载的写法
    meta = ModelCardData(language=["zh", "en"], license="apache-2.0", library_name="peft", base_model=base,
                         tags=["trl", "dpo", "lora", "llm-course"], datasets=[dataset],
                         pipeline_tag="text-generation")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items())
    body = f"""
# {tcfg.hub_model_id or repo.name}

用 TRL `DPOTrainer`（LoRA）在云帆客服/电动车领域的中英文偏好对上对 `{base}` 做的 DPO 微调。

## 数据
`{dataset}`：prompt / chosen / rejected 三元组（礼貌、准确、在政策内的回答为 chosen），90% 训练、10% 评估。

## 训练配方
- beta={tcfg.beta}，learning_rate={tcfg.learning_rate}，max_steps={tcfg.max_steps}，
  batch={tcfg.per_device_train_batch_size}，max_length={tcfg.max_length}
- 配方：`{Path(args.recipe).name}`；启动：`accelerate launch --config_file {Path(args.accelerate_config).name} ...`

## 评估（留出偏好对）
| 指标 | 数值 |
|---|---|
{rows}

## 预期用途
课程演示：客服场景的偏好对齐。上线前请先跑第 5 课 03 的偏见与安全扫描、用真实工单评估。

## 局限
训练步数与数据都很少；不保证事实正确；没有做过安全对齐，不应直接面向公众。
"""
    # 元数据必须放在开头两行 --- 之间的 YAML 头里：Hub 只从那里读 license、tags、datasets 来检索和展示
    card = ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}")
    path = repo / "README.md"
    card.save(path)
    return path


def push(args: Args, out, repo: Path, repo_id: str) -> str:  # noqa: ANN001
    """--push：联网时真的上传；离线时说明并返回 offline。"""
    if not args.push:
        return "skipped"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        out.log.info(f"离线模式（HF_HUB_OFFLINE=1）：不上传。仓库目录已写好：{repo}；联网后运行 "
                     f"`huggingface-cli upload {repo_id} {repo}` 或去掉 HF_HUB_OFFLINE 再加 --push")
        return "offline"
    from huggingface_hub import HfApi

    api = HfApi()
    # private=True：这个模型没做过安全对齐（见模型卡的“局限”），不该一推上去就公开；exist_ok：重跑时作为新提交
    api.create_repo(repo_id, exist_ok=True, private=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(repo), commit_message="DPO (llm-course lesson 5)")
    return "pushed"


def configure(args: Args, out, model, tok, local: Path | None):
    """配方 -> (数据集, 数据集名, 训练配置, 模型配置, 长度统计)：先解析一次拿到数据与批大小，定好评估间隔，
    再带着覆盖项解析一次。"""
    base_path = str(models.resolve(args.resolved_model(), args.source))
    # 设备开关（bf16 / use_cpu）按模型实际所在设备决定，像命令行参数一样追加在配方之后
    flags = {k: v for k, v in train.trainer_flags(model, log=True).items() if isinstance(v, bool)}
    script_args, tcfg, _ = parse_recipe(args, base_path, out.path("trainer"), flags)
    ds, dataset = load_pairs(args, out, script_args, local)   # --data：自己的偏好对换掉配方里的数据集
    # 训练前一行：几对超过 max_length（TRL 从尾部截断：截掉的回答结尾不参与 log π，长回答的偏好信号变弱）
    stats = train.length_report(train.encode_pairs(tok, list(ds["train"])), tcfg.max_length,
                                knob=f"配方 {Path(args.recipe).name} 的 max_length", drop_flag=None)
    # 配方里的 eval/save 策略由脚本接管：评估开销 ≤ 10%（留出对与训练对同分布，按对数算），留留出损失最低的一步
    every = args.eval_steps or train.eval_schedule(
        args.max_steps or tcfg.max_steps, len(ds["test"]), tcfg.per_device_train_batch_size)[1]
    _, tcfg, model_args = parse_recipe(args, base_path, out.path("trainer"), {**flags, **train.best_step_args(every)})
    tcfg.report_to = out.trainer_report_to()
    out.log.info(f"配方 {Path(args.recipe).name}：beta={tcfg.beta}，lr={tcfg.learning_rate}，steps={tcfg.max_steps}，"
                 f"LoRA r={model_args.lora_r}；每 {every} 步评估一次")
    return ds, dataset, tcfg, model_args, stats


def main(args: Args) -> dict:
    from trl import DPOTrainer, get_peft_config

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 配方：先自己读一遍（坏 YAML、NaN、越界、数据集不在：加载模型之前一行拒绝），再由 TrlParser 解析；
    #    配方里的 model_name_or_path 被 --model（或课程默认模型）覆盖，与其它课程脚本一致
    local = _recipe.check(args)
    # 这次解析的结果不用，只为在加载模型前让 TrlParser 报出它不认识或不相容的字段；设备开关先给 CPU 的，
    # 查的是配方本身，与这台机器有没有 GPU 无关（真正的开关在 configure 里按模型所在设备再给）
    parse_recipe(args, args.resolved_model(), out.path("trainer"), {"use_cpu": True, "bf16": False})
    base = args.resolved_model()
    model, tok = models.load_args(args, for_training=True)

    # 2. 数据：datasets 读取（--data 优先）、转对话格式、切分；训练前一行说清超长的对
    ds, dataset, tcfg, model_args, stats = configure(args, out, model, tok, local)

    # 3. DPO：参考模型 = 关掉 LoRA 的同一个模型；第 1 步后报预计用时，超时先评估 + 保存再停，结束时装回最好的一步
    trainer = DPOTrainer(model=model, args=tcfg, train_dataset=ds["train"], eval_dataset=ds["test"],
                         processing_class=tok, peft_config=get_peft_config(model_args))
    train.attach(trainer, args.max_train_minutes)
    # 训练前先量：策略 = 参考模型，损失恰为 log 2、margin 为 0，这就是同一次运行里的基线
    before = trainer.evaluate()
    result = trainer.train()
    kept = train.kept_step(trainer)
    # best_step_args 开了 load_best_model_at_end：装回的是留出损失最低的一步（不一定是最后一步），读它训练中的评估记录
    after = train.kept_metrics(trainer)
    metrics = {"train_loss": result.training_loss,
               "eval_reward_accuracy_before": before["eval_rewards/accuracies"],
               "eval_reward_accuracy": after["eval_rewards/accuracies"],
               "eval_reward_margin_before": before["eval_rewards/margins"],
               "eval_reward_margin": after["eval_rewards/margins"], "eval_loss_before": before["eval_loss"],
               "eval_loss": after["eval_loss"]}
    out.log.info(f"DPO：留出 margin {metrics['eval_reward_margin_before']:.3f} -> {metrics['eval_reward_margin']:.3f}，"
                 f"accuracy {metrics['eval_reward_accuracy_before']:.2f} -> {metrics['eval_reward_accuracy']:.2f}"
                 f"（保留第 {kept['kept_step']} 步）")

    # 4. Hub 仓库目录：adapter（装回的那一步）+ 分词器 + 模型卡 + 配方
    repo = out.path("repo")
    trainer.save_model(str(repo))
    tok.save_pretrained(repo)
    # 配方与启动配置随 adapter 一起上传：别人拿到仓库就能原样复现这次训练
    for f in (args.recipe, args.accelerate_config):
        (repo / Path(f).name).write_text(Path(f).read_text(encoding="utf-8"), encoding="utf-8")
    card = model_card(args, out, repo, base, dataset, tcfg, metrics)

    # 5. 推送（--push；离线时说明）
    repo_id = args.hub_model_id or tcfg.hub_model_id or f"llm-course/{Path(base).name}-dpo"
    status = push(args, out, repo, repo_id)
    return out.finish({**{k: round(float(v), 4) for k, v in metrics.items()}, **kept, **stats,
                       "model_card_path": str(card), "repo_dir": str(repo), "push_status": status,
                       "hub_model_id": repo_id},
                      summary=f"DPO 留出 margin {metrics['eval_reward_margin_before']:.3f}->"
                              f"{metrics['eval_reward_margin']:.3f}；模型卡 {card.name}；推送 {status}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
