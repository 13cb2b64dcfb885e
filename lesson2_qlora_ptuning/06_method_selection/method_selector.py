"""选哪种微调方法：全参数 / LoRA / QLoRA / P-Tuning v2。先用公式估显存，再在本机量出峰值内存验证公式，最后给建议表。

显存公式（每张卡，字节；P = 参数量，P_t = 可训练参数量，T = batch × 序列长度，L 层，隐藏维 h，MLP 维 i，词表 V）：
  权重     全参数 / LoRA / P-Tuning v2：P × w（w = 权重字节：GPU bf16 = 2，CPU fp32 = 4）
           QLoRA：P_linear × 4.127/8（NF4 + 双重量化，见 01）+ 其余参数 × w
  梯度     P_t × w
  优化器   AdamW：P_t × 8（fp32 的 m 与 v）；GPU 混合精度再加 P_t × 4 的 fp32 主权重
  激活     L × T × (10h + 4i) × a + 3 × T × V × 4（a = 激活字节；每层存下的张量：norm 的输入输出、q/k/v/注意力输出、
           MLP 的 gate/up/激活/乘积；最后是 fp32 logits 及其 log_softmax 与梯度）；
           打开梯度检查点时每层只存输入：L × T × h × a，加上重算中的一层
  多卡 ZeRO-3：权重、梯度、优化器状态按卡数平分（激活不分）。
架构只给了参数量时按 h = (128·P/12)^(1/3)、L = h/128、i = 8h/3 估（Llama 类的比例）。

运行：
  python lesson2_qlora_ptuning/06_method_selection/method_selector.py            # tiny-llama 与 smollm2-135m 上测量
  python lesson2_qlora_ptuning/06_method_selection/method_selector.py --smoke    # 只测 tiny-llama
  python lesson2_qlora_ptuning/06_method_selection/method_selector.py --params 7e9 --gpu-mem-gb 24 --gpus 1 \\
      --data-size 5000 --goal quality                                            # 你的情况
  （测量总在 CPU 上做：fp32、进程 RSS 采样；建议表按 GPU 的 bf16 + AdamW 混合精度 + 梯度检查点估算）

你会看到（默认：tiny-llama 8×256 与 smollm2-135m 2×128）：四种方法各一行，公式估计、测得峰值与误差
（estimate_error_pct）；误差都在 ±25% 内，且公式不明显低估（放不下比浪费一点显存更糟）。测得峰值 LoRA 远低于全参数
（不存全量梯度和优化器状态），QLoRA 再低于 LoRA（底座 4 bit）。
建议表（--params / --gpus / --gpu-mem-gb 的几组典型情况）：7B 单卡（--gpu-mem-gb 24 或 80）-> LoRA，全参数连 80 也
放不下；70B 八卡各 80 -> LoRA；70B 单卡 48 -> 只有 QLoRA 放得下。测 QLoRA 前先要把仍映射在 safetensors 文件上的权重
复制进内存（见 build），否则 4-bit 加载时读遍的 fp32 文件页会算进 RSS，峰值虚高。图：estimate_vs_measured.png。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.4 分钟，2.7 GB，结论 7/7 成立
  ✓ 显存公式够用来选型：四种方法里公式与实测峰值相差最大的百分比：12（≤ 25）
  ✓ 公式不低估（放不下比浪费一点显存更糟）：四种方法最差误差里最小的一个（%）：7.7（≥ -5）
  ✓ LoRA 只训练低秩增量，实测峰值远低于全参数：LoRA / 全参数：0.4303（≤ 0.6）
  ✓ QLoRA 把底座压到 4 bit，实测峰值再低于 LoRA：QLoRA / LoRA：0.6418（≤ 0.8）
  ✓ 7B 全参数微调单卡 80 GB 放不下：全参数估计显存 / 卡的显存：1.333（≥ 1.1）
  ✓ 70B 单卡 48 GB 只有 QLoRA 放得下：QLoRA 估计显存 / 卡的显存：0.8521（≤ 0.9）
  ✓ 同一个 70B，LoRA 估计显存超过单卡 48 GB：LoRA 估计显存 / 卡的显存：2.969（≥ 1.1）
<!-- /results -->
"""
import gc
from dataclasses import dataclass

from common import cli, models, run, train
from common.errors import UserError

METHODS = ("full", "lora", "qlora", "ptuning_v2")
GOALS = ("quality", "memory", "multitask")
# 典型情况：(说明, 参数量, 每卡显存 GB, 卡数)
CASES = [("7B on 1x24GB", 7e9, 24, 1), ("7B on 1x80GB", 7e9, 80, 1), ("70B on 8x80GB", 70e9, 80, 8),
         ("70B on 1x48GB", 70e9, 48, 1)]
# 已知架构：Llama-2 7B / 70B 的 (h, L, i, V, kv 维)
# 70B 的 kv 维 1024 = 8 个 KV 头 × 128（GQA）：按 h 算会把 K/V 投影和 P-Tuning 前缀高估 8 倍
SHAPES = {7e9: (4096, 32, 11008, 32000, 4096), 70e9: (8192, 80, 28672, 32000, 1024)}


@dataclass
class Args(cli.CommonArgs):
    params: float = cli.arg(7e9, "要微调的模型参数量（例如 7e9）", min=1e6)
    gpu_mem_gb: float = cli.arg(24.0, "每张卡的显存（GB）", min=1)
    gpus: int = cli.arg(1, "卡数（多卡时按 ZeRO-3 平分权重/梯度/优化器状态）", min=1)
    data_size: int = cli.arg(5000, "训练样本数：很少时（<1000）全参数微调容易过拟合，优先参数高效方法", min=1)
    goal: str = cli.arg("quality", "目标：quality（效果优先）/ memory（省显存）/ multitask（一个底座服务很多任务）",
                        choices=list(GOALS))
    seq_len: int = cli.arg(1024, "估算用的序列长度", min=8)
    batch_size: int = cli.arg(1, "估算用的每卡微批大小（大模型常用 1 + 梯度累积）", min=1)
    lora_r: int = cli.arg(16, "LoRA / QLoRA 的秩", min=1)
    num_virtual_tokens: int = cli.arg(32, "P-Tuning v2 每层前缀长度", min=1)
    measure_models: list[str] = cli.arg(["tiny-llama:8x256", "smollm2-135m:2x128"],
                                        "在哪些模型上实测峰值内存来验证公式；名字:批大小x序列长度（不写就用下面两项）。"
                                        "tiny 用大批：只有 20 MB 时库的固定开销占大头，百分比没有意义")
    measure_batch: int = cli.arg(2, "实测用的批大小（measure_models 里没写时）", min=1)
    measure_seq: int = cli.arg(128, "实测用的序列长度（measure_models 里没写时）", min=8)
    data: str = cli.arg(None, "本脚本不读数据文件：样本数用 --data-size 说，实测峰值内存用随机 token")

    smoke_model = "tiny-llama"

    def __post_init__(self) -> None:
        if self.data:   # CommonArgs 的 --data：给了却悄悄不用，学生会以为推荐是按自己的数据算的
            raise UserError(f"--data {self.data}: 这个脚本不读数据文件（样本数请用 --data-size N 告诉它；"
                            "实测峰值内存用的是随机 token）")


# --smoke：只在 tiny-llama 上实测；加大批和长度，让激活占峰值的大头（公式里最难估的一项也被检验到）
SMOKE = dict(measure_models=["tiny-llama:8x256"])

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；公式的基线是同一次运行里实测的峰值内存
_PEAK = 'max(r["measured_mb"] for r in measurements if r["method"] == "{}")'   # 某方法在最大的实测模型上的峰值
CLAIMS = [
    run.Claim("显存公式够用来选型：四种方法里公式与实测峰值相差最大的百分比",
              "max(abs(e) for e in estimate_error_pct.values())", "<=", 25, 25),
    run.Claim("公式不低估（放不下比浪费一点显存更糟）：四种方法最差误差里最小的一个（%）",
              "min(estimate_error_pct.values())", ">=", -5, -5),
    # 极小模型上激活占峰值的大头（8×256），几种方法的实测峰值只差几 MB，冒烟不检查
    run.Claim("LoRA 只训练低秩增量，实测峰值远低于全参数：LoRA / 全参数",
              f"{_PEAK.format('lora')} / {_PEAK.format('full')}", "<=", None, 0.6),
    run.Claim("QLoRA 把底座压到 4 bit，实测峰值再低于 LoRA：QLoRA / LoRA",
              f"{_PEAK.format('qlora')} / {_PEAK.format('lora')}", "<=", None, 0.8),
    # 建议表的顺序即 CASES：[1] = 7B 单卡 80 GB，[3] = 70B 单卡 48 GB
    run.Claim("7B 全参数微调单卡 80 GB 放不下：全参数估计显存 / 卡的显存",
              'recommendations[1]["estimate_gb"]["full"] / recommendations[1]["gpu_mem_gb"]', ">=", 1.1, 1.1),
    run.Claim("70B 单卡 48 GB 只有 QLoRA 放得下：QLoRA 估计显存 / 卡的显存",
              'recommendations[3]["estimate_gb"]["qlora"] / recommendations[3]["gpu_mem_gb"]', "<=", 0.9, 0.9),
    run.Claim("同一个 70B，LoRA 估计显存超过单卡 48 GB：LoRA 估计显存 / 卡的显存",
              'recommendations[3]["estimate_gb"]["lora"] / recommendations[3]["gpu_mem_gb"]', ">=", 1.1, 1.1),
]


def shape_of(cfg) -> dict:
    """从 transformers config 取公式需要的维度（kv 维单算：GQA 模型的 K/V 投影比 Q 小，参数和前缀都按它算）。"""
    kv = cfg.hidden_size // cfg.num_attention_heads * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    return dict(h=cfg.hidden_size, L=cfg.num_hidden_layers, i=cfg.intermediate_size, V=cfg.vocab_size, kv=kv)


def shape_from_params(p: float) -> dict:
    """只知道参数量时：已知的 7B/70B 用真实形状，否则按 Llama 比例推。

    激活项 ∝ 层数 × 隐藏维，同样的参数量"宽而浅"与"窄而深"差好几倍；能用真实形状就不要用推出来的。
    """
    if p in SHAPES:
        h, L, i, V, kv = SHAPES[p]
    else:
        # Llama 类每层约 12h² 个参数（注意力 4h² + MLP 3·h·8h/3 = 8h²），L = h/128 时 P = 12h³/128，反解出 h；
        # 取 128 的倍数：头维 128 是 Llama 的惯例，h 要能被头维整除
        h = int(round((128 * p / 12) ** (1 / 3) / 128) * 128) or 128
        # L 用 P / (12h²) 反算而不是直接 h/128：h 取整之后总参数量仍对得上 P；
        # kv = h 即按 MHA 估，遇到 GQA 模型会偏高——宁可高估，放不下比浪费一点更糟
        L, i, V, kv = max(1, round(p / (12 * h * h))), int(8 * h / 3), 32000, h
    return dict(h=h, L=L, i=i, V=V, kv=kv)


def estimate(s: dict, method: str, batch: int, seq: int, r: int, n_virtual: int, gpu: bool, gpus: int = 1,
             ckpt: bool = False) -> dict:
    """按文档里的公式估一个训练步的峰值内存（字节），分四项返回。"""
    h, L, i, V, kv = s["h"], s["L"], s["i"], s["V"], s["kv"]
    # q/o 各 h×h、k/v 各 h×kv、gate/up/down 各 h×i；k/v 用 kv 而不是 h，GQA 模型才不被高估
    p_lin = L * (h * (2 * h + 2 * kv) + 3 * h * i)
    p_all = p_lin + V * h + L * 2 * h + h      # embedding 与 lm_head 绑定时只算一次
    w = 2 if gpu else 4   # GPU 按 bf16 估；CPU 实测用 fp32——公式和实测同口径，验证才有意义
    # LoRA 每个 Linear 加 r × (in + out)：挂在全部 7 个 Linear 上（all-linear，与 02 一致）；
    # P-Tuning v2 每层 K、V 各 n_virtual × kv（不带 projection 时前缀本身就是参数）
    trainable = {"full": p_all, "lora": L * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3),
                 "qlora": L * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3),
                 "ptuning_v2": L * 2 * n_virtual * kv}[method]
    weights = p_lin * 4.127 / 8 + (p_all - p_lin) * w if method == "qlora" else p_all * w
    # 梯度只为可训练参数分配：冻结的底座 requires_grad=False，这是 LoRA 省内存的一大头
    grads = trainable * w
    optim = trainable * (12 if gpu else 8)   # AdamW 的 m、v 各一份 fp32；GPU 混合精度再加 fp32 主权重
    T = batch * seq
    per_layer = T * h * w if ckpt else T * (10 * h + 4 * i) * w
    # 词表项按 fp32：logits 要在 fp32 下做 softmax 才不溢出；smollm2 的 49k 词表让这一项常是激活的大头
    acts = L * per_layer + (T * (10 * h + 4 * i) * w if ckpt else 0) + 3 * T * V * 4
    shard = gpus if gpus > 1 else 1   # ZeRO-3 只切模型状态；激活是每张卡自己那份微批的，不切
    return {"weights": weights / shard, "grads": grads / shard, "optimizer": optim / shard, "activations": acts,
            "total": (weights + grads + optim) / shard + acts}



def build(name: str, method: str, args: Args):
    """按方法加载并包装模型（与 02/03 相同的做法）。"""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, BitsAndBytesConfig

    kw = {}
    if method == "qlora":
        cfg = AutoConfig.from_pretrained(models.resolve(name))
        # lm_head 不量化（bitsandbytes 4-bit 加载的惯例）；down_proj 行长不是 64 倍数时 bitsandbytes 的 CPU 内核
        # 反量化算错（01 量出来的），这类层保持 fp32
        skip = ["lm_head"] + (["down_proj"] if cfg.intermediate_size % 64 else [])
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.float32,
                                                         llm_int8_skip_modules=skip), device_map={"": "cpu"})
    # 实测固定 CPU fp32：validate_formula 的公式按 w = 4 写，换精度就不是在验证同一个公式
    model, _ = models.load(name, device="cpu", dtype="float32", **kw)
    # 仍映射在 safetensors 文件上的权重复制进进程内存：4-bit 加载时读遍了整个 fp32 文件，只要还有一个张量（绑定的
    # embedding）引用这个映射，文件的页就一直算在 RSS 里（实测多 ~400 MB 的 RssFile），那不是训练占用的内存
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.data = p.data.clone()
    if method == "qlora":
        # 不开检查点：validate_formula 用的是 ckpt=False 的公式，实测也得同样设置
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        # lora_dropout=0：大于 0 时 PEFT 为每个 Linear 的输入另存一份 dropout 后的副本，公式里没有这项激活
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    if method == "ptuning_v2":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=args.num_virtual_tokens))
    return model


def measure_spec(spec: str, args: Args) -> tuple[str, int, int]:
    """"smollm2-135m:2x128" -> (名字, 批大小, 序列长度)；没写形状就用 --measure-batch / --measure-seq。"""
    name, _, shape = spec.partition(":")
    try:
        b, t = (int(x) for x in shape.lower().split("x")) if shape else (args.measure_batch, args.measure_seq)
    except ValueError:
        raise UserError(f"--measure-models {spec}: 形状要写成 批大小x序列长度，例如 smollm2-135m:2x128") from None
    return name, b, t


def measure(name: str, method: str, args: Args, batch_size: int, seq: int) -> float:
    """实测：加载前的 RSS 为基线，一个完整训练步（前向 + 反向 + AdamW 更新）期间的峰值（MB）。

    峰值只在训练步里采样：加载时的瞬时占用（读 safetensors 的 mmap 页、4-bit 量化前的 fp32 副本）不属于训练，
    但加载后常驻的权重算在里面（基线取在加载之前）。
    """
    import psutil
    import torch

    gc.collect()
    train.release_memory()
    rss0 = psutil.Process().memory_info().rss
    model = build(name, method, args)
    model.train()
    # 建好模型再整理一次：加载时的临时副本（如 4-bit 量化前的 fp32）释放后还给系统，不垫高训练步的起点
    gc.collect()
    train.release_memory()
    # 随机 token 就够：稠密模型一步训练的内存只由形状决定，与 token 内容无关
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq))
    # foreach=False：foreach 实现一次为所有参数建临时张量（约多一份可训练参数大小），公式的 8 字节/参数没算它
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    # opt.step() 必须在量的范围里：AdamW 的 m、v 第一次 step 时才分配，不然优化器那一项量不到
    with train.PeakMemory("cpu") as mem:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    # 减的是加载前的 RSS 而不是 PeakMemory 的起点：常驻的权重要算进来，对应公式里的 weights 项
    peak = (mem.peak_abs_mb * 2**20 - rss0) / 2**20
    del model, opt
    gc.collect()
    train.release_memory()
    return peak


def recommend(p: float, gpu_mem_gb: float, gpus: int, data_size: int, goal: str, args: Args) -> dict:
    """对每种方法估显存（GPU、bf16、梯度检查点），按目标的偏好顺序选第一个放得下的。"""
    s = shape_from_params(p)
    # 建议表按 GPU 上的实际做法估：bf16 + 混合精度 AdamW + 梯度检查点（ckpt=True），
    # 与上面在 CPU 上验证的是同一个公式，只换了口径
    est = {m: estimate(s, m, args.batch_size, args.seq_len, args.lora_r, args.num_virtual_tokens, gpu=True,
                       gpus=gpus, ckpt=True)["total"] / 1e9 for m in METHODS}
    # multitask 先试 P-Tuning v2：每个任务只存一小份前缀，同一个底座服务所有任务
    order = {"quality": ["full", "lora", "qlora", "ptuning_v2"], "memory": ["qlora", "lora", "ptuning_v2", "full"],
             "multitask": ["ptuning_v2", "lora", "qlora", "full"]}[goal]
    if data_size < 1000 and goal == "quality":   # 数据太少：全参数微调容易过拟合，低秩约束反而是正则
        order = ["lora", "qlora", "full", "ptuning_v2"]
    fits = [m for m in order if est[m] <= 0.9 * gpu_mem_gb]   # 留 10% 给 CUDA 上下文与碎片
    choice = fits[0] if fits else "none (add GPUs or CPU offload)"
    return {"method": choice, "estimate_gb": {m: round(v, 1) for m, v in est.items()}}


def validate_formula(args: Args, log) -> tuple[list[dict], dict]:
    """每个实测模型 × 每种方法：公式估计 vs 实测峰值。返回 (逐行结果, 每种方法的各次误差 %)。

    先在 CPU fp32 上验证公式（能实测的地方），再用同一个公式去估 GPU bf16 的情况：公式错了，建议表就跟着错。
    """
    from transformers import AutoConfig

    errors, rows = {m: [] for m in METHODS}, []
    # 预热一次（结果丢掉）：进程里第一次训练步会一次性分配库的缓存、线程池，算进哪个方法都不公平
    specs = [measure_spec(x, args) for x in args.measure_models]
    measure(specs[0][0], "lora", args, *specs[0][1:])
    for name, b, t in specs:
        s = shape_of(AutoConfig.from_pretrained(models.resolve(name)))
        for m in METHODS:
            # gpu=False：和实测同口径，权重、梯度按 fp32 的 4 字节，优化器 8 字节/参数（没有混合精度的主权重）
            est = estimate(s, m, b, t, args.lora_r, args.num_virtual_tokens, gpu=False)["total"] / 2**20
            meas = measure(name, m, args, b, t)
            err = (est - meas) / meas * 100   # 相对实测：公式偏大为正（宁可高估，放不下比浪费一点显存更糟）
            errors[m].append(err)
            rows.append({"model": name, "batch": f"{b}x{t}", "method": m, "estimate_mb": round(est, 1),
                         "measured_mb": round(meas, 1), "error_pct": round(err, 1)})
            log.info(f"{name:14s} {m:11s} 公式 {est:8.1f} MB  实测 {meas:8.1f} MB  误差 {err:+6.1f}%")
    return rows, errors


def plot_estimates(out, rows: list[dict]) -> None:
    """公式估计 vs 实测峰值的散点，y = x 与 ±25% 两条参考线：点落在两线之间，公式就够用来选型。"""
    fig, save = out.plot("estimate_vs_measured.png")
    ax = fig.add_subplot(111)
    for r in rows:
        ax.scatter(r["measured_mb"], r["estimate_mb"], label=f"{r['model']} {r['method']}")
    lim = max(max(r["measured_mb"], r["estimate_mb"]) for r in rows) * 1.1
    ax.plot([0, lim], [0, lim], "k:", label="y = x")
    ax.plot([0, lim], [0, lim * 1.25], "C7", lw=0.5)
    ax.plot([0, lim], [0, lim * 0.75], "C7", lw=0.5)
    ax.set_xlabel("measured peak (MB)")
    ax.set_ylabel("formula estimate (MB)")
    ax.set_title("Memory formula vs measured peak (one training step, CPU fp32)")
    ax.legend(fontsize=6)
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 用公式估，再在本机实测，比较每种方法的误差：没验证过的公式给出的建议不可信
    rows, errors = validate_formula(args, out.log)
    # 每种方法取绝对值最大的那次、保留符号：CLAIMS 既要查偏差多大，也要查是不是低估
    worst = {m: round(max(v, key=abs), 1) for m, v in errors.items()}

    # 2. 典型情况的建议表 + 你的情况（典型情况固定 10000 条数据，只看显存放不放得下）
    recs = [{"case": c, "goal": "quality", "gpu_mem_gb": g, **recommend(p, g, n, 10000, "quality", args)}
            for c, p, g, n in CASES]
    for r in recs:
        out.log.info(f"{r['case']:16s} -> {r['method']:10s} 估计显存 GB {r['estimate_gb']}")
    mine = recommend(args.params, args.gpu_mem_gb, args.gpus, args.data_size, args.goal, args)
    out.log.info(f"你的情况 {args.params:.3g} 参数、{args.gpus}×{args.gpu_mem_gb:g} GB、{args.data_size} 条、"
                 f"目标 {args.goal} -> {mine['method']}")

    # 3. 图：公式 vs 实测；±25% 是选型够用的精度（显存档位 24/48/80 GB 之间差 2 倍左右）
    plot_estimates(out, rows)
    within = all(abs(e) <= 25 for v in errors.values() for e in v)
    return out.finish({"estimate_error_pct": worst, "within_25pct": within, "measurements": rows,
                       "recommendations": recs, "your_case": {"params": args.params, "gpu_mem_gb": args.gpu_mem_gb,
                                                              "gpus": args.gpus, "goal": args.goal, **mine}},
                      summary="公式误差（最差）" + "，".join(f"{m} {e:+.0f}%" for m, e in worst.items())
                              + "；" + "；".join(f"{r['case']} -> {r['method']}" for r in recs), claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
