"""CPU 推理部署：把"快多少、差多少"并排量出来——批大小、KV 缓存、fp32/bf16/int8、线程数。

运行：
  python lesson1_sft/06_cpu_deploy/cpu_inference_case.py           # smollm2-135m
  python lesson1_sft/06_cpu_deploy/cpu_inference_case.py --smoke   # 极小模型
  python lesson1_sft/06_cpu_deploy/cpu_inference_case.py \
      --model Qwen/Qwen2.5-0.5B-Instruct --source hf --config configs/lesson1/cpu_inference_case.yaml
      # 更大的模型，仍在 CPU 上测（本课讲 CPU 部署；有 GPU 也固定用 CPU）

每个配置先预热一次，再轮流计时 --repeats 轮取中位数：机器上别的进程忽快忽慢时，轮流测能让各配置
受到同样的干扰，中位数再去掉偶发的尖峰。每次生成固定 --max-new-tokens 个 token（min_new_tokens 同值），
吞吐 = 批大小 × 新 token 数 / 总用时；首 token 延迟（TTFT）用一个 streamer 记下第一个新 token 出现的时刻。

你会看到：fp32、批 1、开 KV 缓存是基线（tokens/s 与首 token 延迟）。关掉 KV 缓存，每生成一个 token 都把整段前文重算
一遍（送进前向的 token 数多一个数量级以上），明显变慢；bf16 权重减半、困惑度几乎不变。速度分两段看：AMX（bf16 矩阵
单元）加速的是多行的矩阵乘——预填充（首 token）与大批；批 1 逐 token 解码是矩阵乘向量，AMX 也不加速（有 AMX 的
CPU 上两个比值都在 metrics.json 的 bf16_prefill_speedup 与 bf16_speedup，课程 README 的效率表列着参考运行的值）。
只有 AVX512_BF16 点积指令的 CPU 上 bf16 两段都比 fp32 慢（make bench 的表里有比值），更老的 CPU 上是模拟的，
更慢——没有 AMX 时"bf16 加快预填充"这一条记"未检查"，两个比值照实报。
int8w 只量化权重、激活用 bf16（common.models.weight_only，第 5 课聊天服务的 --weights int8）：逐 token 解码
读的权重字节少了大半，所以比 fp32 快，困惑度几乎不变；贪心输出仍会在某个 token 处与 fp32 分岔。int4w 每 32 个一组
（与 GGUF 的 Q4_1 同一种格子，输出层留 int8，聊天服务的 --weights int4）：读的字节再减一半，困惑度仍贴近 fp32。
动态 int8 的激活按整个张量在运行时量化：某一层输入里有离群值时就伤精度。脚本先逐类扫描（每次只量化一类 Linear，
在校准样本上量困惑度比），把超过 --int8-sensitivity 的那类留在 fp32：
smollm2 上是 MLP 的输出投影 down_proj（"全部量化"的对照行 int8_all 困惑度翻倍以上），留下它之后 int8 仍更快、权重
变小、困惑度接近 fp32；批 8 的总吞吐是批 1 的好几倍，但每个请求的首 token 更晚（吞吐与延迟的取舍）；
2 线程比 1 线程快得远不到 2 倍（逐 token 解码有一部分受内存带宽限制；快多少随机器的内存带宽变，见下面的参考运行）。
--smoke（tiny-llama，128 个新 token）：同样看得到 KV 缓存省下的前向计算。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.4 分钟，4.3 GB，结论 16/16 成立
  ✓ KV 缓存省下前向计算：不开 / 开缓存时一次生成送进前向的 token 数：27.36（≥ 10）
  ✓ KV 缓存提速：开 / 不开缓存的 tokens/s（轮流计时取中位数）：3.377（≥ 2）
  ✓ bf16 几乎不损精度：bf16 / fp32 困惑度（同一批回复 token，逐 token 对着真实下文算）：0.9952（≤ 1.02）
  ✓ bf16 加快预填充（仅在 CPU 有 AMX 时检查）：fp32 / bf16 的首 token 延迟：2.085（≥ 1.3）
  ✓ bf16 权重减半：bf16 / fp32 的权重体积：0.5002（≤ 0.55）
  ✓ 动态 int8（混合精度）提速：int8 / fp32 的 tokens/s：1.192（≥ 1.05）
  ✓ 只量化权重的 int8（激活 bf16）提速：int8w / fp32 的 tokens/s：1.334（≥ 1.15）
  ✓ 只量化权重的 int8 几乎不损精度：int8w / fp32 困惑度：1.008（≤ 1.05）
  ✓ 只量化权重的 int4（每 32 个一组，输出层 int8）不损精度：int4w / fp32 困惑度：1（≤ 1.05）
  ✓ int4 比 int8 快（每个 token 读的权重字节约一半）：int4w / int8w 的 tokens/s：1.308（≥ 1.05）
  ✓ 动态 int8（混合精度）权重变小：int8 / fp32 的权重体积：0.757（≤ 0.8）
  ✓ 逐类扫描后的 int8 保住精度：int8 / fp32 困惑度（同一批回复 token，不用于扫描）：1.062（≤ 1.1）
  ✓ 不扫描、全部 Linear 量化会伤精度：全部量化 / 混合精度 int8 的困惑度：2.783（≥ 1.3）
  ✓ 批量提高总吞吐：最大批 / 批 1 的总 tokens/s：3.758（≥ 2.5）
  ✓ 批量让每个请求的首 token 更晚：最大批 / 批 1 的首 token 延迟：4.275（≥ 2）
  ✓ 逐 token 解码部分受内存带宽限制，加线程的收益低于线性：全部 / 1 个线程的 tokens/s（2 核）：1.627（≤ 1.85）
<!-- /results -->
"""
import copy
import statistics
import time
import warnings
from dataclasses import dataclass

from common import cli, data, lm, models, run
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    batch_sizes: list[int] = cli.arg([1, 2, 4, 8], "要比较的批大小（fp32 + KV 缓存下测）", min=1)
    max_new_tokens: int = cli.arg(32, "每次生成的新 token 数：越长，KV 缓存的好处越明显", min=2)
    repeats: int = cli.arg(2, "每个配置计时几轮，取中位数（另有 1 轮预热不计）", min=1)
    ppl_samples: int = cli.arg(24, "算困惑度用的样本条数（fp32 / bf16 / int8 用同一批）", min=1)
    max_length: int = cli.arg(256, "算困惑度时每条样本最多多少 token", min=8)
    calib_samples: int = cli.arg(8, "int8 逐层敏感度扫描用的校准样本数（取在算困惑度的样本之后，不重叠）", min=1)
    int8_sensitivity: float = cli.arg(1.05, "某类 Linear 单独量化后困惑度比超过它，这类就留在 fp32", min=1.0)

    smoke_model = "tiny-llama"


# 冒烟：少几种批大小、少几条困惑度样本；极小模型每步开销以 Python 调度为主，要生成 128 个新 token，
# 不开 KV 缓存时"每步重算整段前文"的平方级代价才压过固定开销（24 个 token 时只快约 1.5 倍）。
# 冒烟时 run.start 至多用 2 个线程；并排跑（course.py、pytest）时压到 1 个：max_threads 就是 1，不出现 fp32_1thread
# 这一行。默认运行才检查线程的结论
SMOKE = dict(batch_sizes=[1, 4], ppl_samples=8, max_new_tokens=128, repeats=2)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（fp32、批 1、开缓存、全部线程）在同一次运行里量
# 墙钟比值在共享的 2 核上会翻转：冒烟只检查差距 ≥ 3 倍的（批量吞吐）和与机器快慢无关的（前向 token 数、困惑度、体积）
CLAIMS = [
    run.Claim("KV 缓存省下前向计算：不开 / 开缓存时一次生成送进前向的 token 数",
              'forward_tokens["no_kv_cache"] / forward_tokens["kv_cache"]', ">=", 10, 10),
    run.Claim("KV 缓存提速：开 / 不开缓存的 tokens/s（轮流计时取中位数）", "kv_cache_speedup", ">=", None, 2.0),
    run.Claim("bf16 几乎不损精度：bf16 / fp32 困惑度（同一批回复 token，逐 token 对着真实下文算）",
              'perplexity["bf16"] / perplexity["fp32"]', "<=", 1.02, 1.02),
    # AMX 的 bf16 矩阵单元一次算一整块多行的矩阵乘：预填充（提示的每个 token 一行）受益，批 1 解码（1 行）不受益，
    # 所以这条比首 token 延迟而不是解码的 tokens/s。没有 AMX 的 CPU 上 bf16 不比 fp32 快（只有 AVX512_BF16 的 2 核
    # Xeon 上也更慢，make bench 表；更老的 CPU 上是模拟的）：那时不出这个指标，这条记"未检查"
    run.Claim("bf16 加快预填充（仅在 CPU 有 AMX 时检查）：fp32 / bf16 的首 token 延迟", "bf16_prefill_speedup_native",
              ">=", None, 1.3),
    run.Claim("bf16 权重减半：bf16 / fp32 的权重体积", 'size_mb["bf16"] / size_mb["fp32"]', "<=", 0.55, 0.55),
    # 敏感的那类 Linear 留在 fp32 后，量化的权重少了，提速与体积都比"全部量化"小：门槛按混合精度的 int8 定
    # 门槛 1.05 而不是 1.2：两台 2 核机器（Xeon、AMD EPYC）的参考运行里 Xeon 上的比值低得多，
    # 逐 token 解码里 int8 省下的读权重时间被运行时量化激活的开销吃掉一部分
    run.Claim("动态 int8（混合精度）提速：int8 / fp32 的 tokens/s", "int8_speedup", ">=", None, 1.05),
    run.Claim("只量化权重的 int8（激活 bf16）提速：int8w / fp32 的 tokens/s", "int8w_speedup", ">=", None, 1.15),
    run.Claim("只量化权重的 int8 几乎不损精度：int8w / fp32 困惑度", 'perplexity["int8w"] / perplexity["fp32"]', "<=",
              1.05, 1.05),
    # int4 的码与 SmolLM2 GGUF 里 Q4_1 的码逐个相同（只差 scale 的 bf16 舍入）：困惑度应与 int8w 一样贴近 fp32。
    # 极小模型的权重不在这个格子上，冒烟不检查
    run.Claim("只量化权重的 int4（每 32 个一组，输出层 int8）不损精度：int4w / fp32 困惑度",
              'perplexity["int4w"] / perplexity["fp32"]', "<=", None, 1.05),
    run.Claim("int4 比 int8 快（每个 token 读的权重字节约一半）：int4w / int8w 的 tokens/s", "int4w_vs_int8w_speedup",
              ">=", None, 1.05),
    run.Claim("动态 int8（混合精度）权重变小：int8 / fp32 的权重体积", 'size_mb["int8"] / size_mb["fp32"]', "<=",
              0.9, 0.8),
    run.Claim("逐类扫描后的 int8 保住精度：int8 / fp32 困惑度（同一批回复 token，不用于扫描）",
              'perplexity["int8"] / perplexity["fp32"]', "<=", 1.05, 1.1),
    # 对照：不扫描、全部 Linear 一起量化。smollm2 上一类层（MLP 输出投影）就把困惑度抬到两倍以上；极小模型的激活
    # 没有这种离群值，冒烟不检查
    run.Claim("不扫描、全部 Linear 量化会伤精度：全部量化 / 混合精度 int8 的困惑度",
              'perplexity["int8_all"] / perplexity["int8"]', ">=", None, 1.3),
    run.Claim("批量提高总吞吐：最大批 / 批 1 的总 tokens/s", "batch_throughput_gain", ">=", 2.0, 2.5),
    run.Claim("批量让每个请求的首 token 更晚：最大批 / 批 1 的首 token 延迟", "batch_first_token_slowdown", ">=",
              None, 2.0),
    # 线性加速是 2 倍（2 核）。两台机器的参考运行差得很远（AMD EPYC 几乎不快，Xeon 快一半多）：都到不了线性
    run.Claim("逐 token 解码部分受内存带宽限制，加线程的收益低于线性：全部 / 1 个线程的 tokens/s（2 核）",
              "thread_speedup", "<=", None, 1.85),
]


class FirstTokenTimer:
    """generate 的 streamer：第一次 put 是提示词，第二次 put 才是第一个新 token，记下那一刻。"""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:  # noqa: ANN001 - transformers 传入 token 张量
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    # generate 结束时会调用 streamer.end()：接口要求有这个方法，计时不需要收尾
    def end(self) -> None:
        pass


def timed_generate(model, enc: dict, new_tokens: int, use_cache: bool) -> tuple[float, float, int]:
    """生成一次，返回 (总秒数, 首 token 秒数, 新 token 总数)。"""
    import torch

    streamer = FirstTokenTimer()
    t0 = time.perf_counter()
    # inference_mode 比 no_grad 更省：张量不记版本计数，计到的时间里不含 autograd 的簿记
    with torch.inference_mode():
        # min_new_tokens 同值：遇到 EOS 也不提前停，各配置生成同样多的 token，吞吐才可比；贪心解码不引入随机性
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, streamer=streamer)
    total = time.perf_counter() - t0
    # 批里每条都生成同样多的新 token（min_new_tokens 保证），所以新 token 数 × 批大小
    n_new = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return total, (streamer.first or time.perf_counter()) - t0, n_new


def forward_tokens(model, enc: dict, new_tokens: int) -> dict[str, int]:
    """数一次生成真正送进前向的 token（与机器快慢无关）：开缓存时每步只算 1 个新 token，不开时每步重算整段前文。"""
    fed: list[int] = []
    # generate 用关键字参数调用 forward：要 with_kwargs=True 才拿得到 input_ids
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    counts = {}
    try:
        for name, use_cache in (("kv_cache", True), ("no_kv_cache", False)):
            fed.clear()
            timed_generate(model, dict(enc), new_tokens, use_cache)
            counts[name] = sum(fed)
    finally:
        # 钩子一定摘掉：否则之后计时的每次前向都多一次 Python 回调
        hook.remove()
    return counts


def load_baseline(args: Args, log):
    """fp32 基线模型 + 分词器 + 对话。本课讲 CPU 部署：即使有 GPU 也固定在 CPU 上测。"""
    if models.pick_device(args.device).type == "cuda":   # --device cuda 而没有 CUDA：一行错误（pick_device）
        log.info("本课测量 CPU 推理：忽略 GPU，全部在 CPU 上运行")
    if args.dtype not in ("auto", "float32", "fp32"):
        log.info(f"--dtype {args.dtype}: 本脚本把 fp32、bf16、int8 都测一遍，基线固定 fp32")
    convs = data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl")   # 先读数据：坏文件不等模型加载完才报
    model, tok = models.load_args(args, device="cpu", dtype="float32")
    model.eval()
    # 仅解码器模型批量生成时要左填充，新 token 才紧接在各自提示词后面；超长的提示从左边截到 --max-length，
    # 保留离回答最近的部分（一条 5 MB 的记录不截断时要跑几分钟）
    tok.padding_side, tok.truncation_side = "left", "left"
    return model, tok, convs


def int8_sensitivity(model, rows: list[dict], pad_id: int) -> dict[str, float]:
    """逐类 Linear（q_proj、down_proj……按名字最后一段分类）单独做动态 int8、其余保持 fp32，量校准样本上的困惑度比。
    动态 int8 的激活按整个张量取一个尺度：某一层的输入有离群值（小模型的 MLP 输出投影常见）时，其余数值全被压进
    几个量化格子里——哪一层这样，量一量就知道，不用猜。"""
    import torch
    from torch.ao.quantization import quantize_dynamic

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    # batch_size=1：动态 int8 的激活尺度按整个张量算，拼批会让样本互相影响（同 perplexities）
    base = lm.perplexity(model, rows, batch_size=1, pad_token_id=pad_id)
    scan = {}
    for kind in sorted({n.rsplit(".", 1)[-1] for n in names}):
        q = quantize_dynamic(copy.deepcopy(model), {n for n in names if n.rsplit(".", 1)[-1] == kind},
                             dtype=torch.qint8)
        scan[kind] = round(lm.perplexity(q, rows, batch_size=1, pad_token_id=pad_id) / base, 4)
        del q
    return scan


def precision_variants(model, calib: list[dict], pad_id: int, limit: float, log) -> tuple[dict, dict, list[str]]:
    """fp32（基线）、bf16（权重和计算减半位宽）、动态 int8（Linear 权重 int8，激活运行时量化）：
    int8_all 把全部 Linear 量化；int8 先逐类扫描，单独量化就让困惑度涨过 limit 的那类留在 fp32（混合精度）。"""
    import torch

    # 先 deepcopy：nn.Module.to() 就地改原模型并返回它自己，fp32 基线还要留着对比
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    if not models.cpu_has_bf16():
        log.warning("这颗 CPU 没有 AMX：bf16 矩阵乘不比 fp32 快（只有 AVX512_BF16 时也更慢，更老的 CPU 上是"
                    "模拟的），内存减半仍成立")
    # torch 2.10 起 torch.ao.quantization 被标记为弃用，官方建议迁移到 torchao 的 quantize_(...)；
    # 但 torchao 的 int8 在 CPU 上要配合 torch.compile 才快，eager 模式下比 fp32 慢一个数量级（见 README）。
    # torch 2.13 里 quantize_dynamic 仍然可用、仍走 fbgemm/oneDNN 的 int8 GEMM，所以这里继续用它并屏蔽弃用警告。
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 对照组：不扫描、全部 Linear 一起量化，量出"逐类扫描"到底省下多少精度
        int8_all = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        scan = int8_sensitivity(model, calib, pad_id)
        # 只把超过 --int8-sensitivity 的那几类留在 fp32：放弃少数几类的提速，换回大部分精度
        keep = [k for k, v in scan.items() if v > limit]
        names = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in keep}
        int8 = quantize_dynamic(copy.deepcopy(model), names, dtype=torch.qint8)
    log.info("int8：torch.ao.quantization.quantize_dynamic（已弃用但在 torch 2.13 可用；迁移目标是 torchao.quantize_）")
    log.info(f"int8 逐类敏感度（单独量化这一类时的困惑度比，{len(calib)} 条校准样本）：{scan}；"
             f"留在 fp32：{keep or '无'}")
    # 只量化权重（激活不动）：逐 token 解码读的权重字节约 1/4，没有激活离群值的问题；第 5 课聊天服务的 --weights int8
    int8w, int4w = copy.deepcopy(model), copy.deepcopy(model)
    models.weight_only(int8w)
    # int4：每 32 个一组、组内 min/max（GGUF Q4_1 的格子），输出层留 int8；读的字节再减一半（聊天服务的 --weights int4）
    models.weight_only(int4w, bits=4)
    return {"fp32": model, "bf16": bf16, "int8": int8, "int8_all": int8_all, "int8w": int8w, "int4w": int4w}, scan, keep


def config_table(batch_sizes: list[int], max_threads: int) -> dict[str, tuple[str, int, bool, int]]:
    """名字 -> (精度, 批大小, KV 缓存, 线程数)。每行只改一个变量，其余与基线（fp32、批 1、KV 缓存、全部线程）相同：
    同时改两样，快慢就分不清该归功于谁。"""
    configs = {"fp32": ("fp32", 1, True, max_threads), "fp32_no_kv": ("fp32", 1, False, max_threads),
               "bf16": ("bf16", 1, True, max_threads), "int8": ("int8", 1, True, max_threads),
               "int8w": ("int8w", 1, True, max_threads), "int4w": ("int4w", 1, True, max_threads)}
    for bs in batch_sizes:
        if bs > 1:
            configs[f"fp32_bs{bs}"] = ("fp32", bs, True, max_threads)
    if max_threads > 1:   # 只有一个线程可用时，"少用线程"这一行没有意义
        configs["fp32_1thread"] = ("fp32", 1, True, 1)
    return configs


def time_configs(args: Args, configs: dict, variants: dict, encs: dict, max_threads: int, log) -> dict:
    """先每个配置预热一次（分配内存、选 GEMM 内核），再按轮次轮流测 -> {配置: [(总秒数, 首 token 秒数, 新 token 数)]}。

    轮流而不是一个配置连测完：机器上别的进程忽快忽慢时，各配置受到同样的干扰，比值才可信。
    """
    import torch

    times: dict[str, list[tuple[float, float, int]]] = {k: [] for k in configs}
    for rnd in range(args.repeats + 1):
        for cname, (variant, bs, use_cache, threads) in configs.items():
            # 线程数是进程全局的：每个配置测之前设好，一轮结束再恢复成全部线程
            torch.set_num_threads(threads)
            res = timed_generate(variants[variant], dict(encs[bs]), args.max_new_tokens, use_cache)
            if rnd > 0:   # 第 0 轮是预热：首次调用要分配内存、挑内核，比稳态慢得多
                times[cname].append(res)
        torch.set_num_threads(max_threads)
        log.info(f"{'预热' if rnd == 0 else f'第 {rnd}/{args.repeats} 轮计时'}完成")
    return times


def perplexities(variants: dict, tok, convs: list[list[dict]], max_length: int) -> dict[str, float]:
    """每种精度在同一批对话的助手回复上的困惑度（同一批数据、同一个函数，差别只来自精度）。"""
    rows = [data.tokenize_chat(tok, c, max_length) for c in convs]
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    # batch_size=1：动态 int8 按整个激活张量算量化尺度，几条拼成一批（含填充）会改变彼此的尺度，困惑度就不是单条的了
    return {k: round(lm.perplexity(m, rows, batch_size=1, pad_token_id=tok.pad_token_id), 4)
            for k, m in variants.items()}


def report(out: run.Run, args: Args, configs: dict, tps: dict, ttft: dict) -> None:
    """终端表格 + 吞吐/首 token 延迟的条形图（每个配置一行，与基线的比值一眼可读）。"""
    from rich.console import Console
    from rich.table import Table

    name = args.resolved_model()
    table = Table(title=f"CPU 推理对比（{name}，每次 {args.max_new_tokens} 个新 token，{args.repeats} 轮中位数）")
    for col in ("配置", "精度", "批", "KV", "线程", "tokens/s", "首 token ms", "相对 fp32"):
        table.add_column(col, justify="right" if col not in ("配置", "精度") else "left")
    for cname, (variant, bs, use_cache, threads) in configs.items():
        table.add_row(cname, variant, str(bs), "开" if use_cache else "关", str(threads), f"{tps[cname]:.1f}",
                      f"{ttft[cname]:.0f}", f"{tps[cname] / tps['fp32']:.2f}x")
    # 固定 119 列：不固定时 rich 按当时的终端宽度排，输出重定向到文件时退回 80 列，8 列的表会被折乱
    Console(width=119).print(table)

    fig, save = out.plot("cpu_inference.png")
    fig.set_size_inches(11, 4.2)
    names = list(configs)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.barh(names, [tps[k] for k in names], color="tab:blue")
    ax1.set_xlabel("tokens/s (higher is better)")
    # barh 默认从下往上画：翻过来，条的顺序与终端表格一致（基线 fp32 在最上）
    ax1.invert_yaxis()
    ax2.barh(names, [ttft[k] for k in names], color="tab:orange")
    ax2.set_xlabel("first-token latency ms (lower is better)")
    ax2.invert_yaxis()
    fig.suptitle(f"{name} on CPU: throughput and first-token latency")
    save()


def main(args: Args) -> dict:
    import torch

    args = cli.with_smoke(args, SMOKE)   # 先换参数再 run.start：config.json 记下的是实际跑的参数
    out = run.start(__file__, args)
    if not args.batch_sizes:
        raise UserError("--batch-sizes: 至少给一个批大小")

    # 1. 加载 fp32 基线与数据
    model, tok, convs = load_baseline(args, out.log)
    prompts = [data.prompt_text(tok, c) for c in convs]
    # 在 run.start 之后读：冒烟并排跑时它已设成单线程，max_threads 就是 1，不出现 fp32_1thread 这一行
    max_threads = torch.get_num_threads()
    out.log.info(f"{len(convs)} 条对话；torch 默认 {max_threads} 个线程；有 AMX：{models.cpu_has_bf16()}")

    # 2. 准备三种精度
    # 校准样本取在算困惑度的样本之后：用同一批样本挑要留 fp32 的层再量困惑度，int8 的结果会偏乐观；
    # 数据不够时才退回重叠的那几条（下面告警）
    calib = [{k: r[k] for k in ("input_ids", "labels")} for r in (data.tokenize_chat(tok, c, args.max_length) for c in
             (convs[args.ppl_samples:][:args.calib_samples] or convs[:args.calib_samples]))]
    if len(convs) <= args.ppl_samples:
        out.log.warning(f"只有 {len(convs)} 条对话：校准样本与算困惑度的样本重叠，int8 的困惑度会偏乐观")
    variants, scan, keep = precision_variants(model, calib, tok.pad_token_id, args.int8_sensitivity, out.log)

    # 3. 配置表：每行只改一个变量；每种批大小的输入只编码一次，各配置喂的是同一批 token
    configs = config_table(args.batch_sizes, max_threads)
    # 对话比批大小少时循环复用，批 8 也凑得满；padding 在左边（load_baseline 设的），新 token 紧接各自的提示
    encs = {bs: tok([prompts[i % len(prompts)] for i in range(bs)], return_tensors="pt", padding=True,
                    truncation=True, max_length=args.max_length) for bs in {c[1] for c in configs.values()}}

    # 4. 计时：预热后轮流测，取中位数（偶发的尖峰不影响中位数）
    times = time_configs(args, configs, variants, encs, max_threads, out.log)
    # 每轮各算一个吞吐再取中位数：某一轮被别的进程拖慢，只影响那一个数
    tps = {k: round(statistics.median(n / t for t, _, n in v), 2) for k, v in times.items()}
    ttft = {k: round(statistics.median(f for _, f, _ in v) * 1000, 1) for k, v in times.items()}
    new_tokens = {k: v[-1][2] for k, v in times.items()}
    fed = forward_tokens(variants["fp32"], encs[1], args.max_new_tokens)   # 基线 fp32 一定有批 1 这一行

    # 5. 精度代价：同一批留出文本上的困惑度（快了多少要和差了多少一起看）+ 部署时要加载的权重体积
    ppl = perplexities(variants, tok, convs[: args.ppl_samples], args.max_length)
    sizes = {k: round(lm.size_mb(m), 1) for k, m in variants.items()}

    # 6. 表格 + 图
    report(out, args, configs, tps, ttft)
    out.log.info(f"困惑度 {ppl}；权重体积 MB {sizes}")
    top_bs = max(args.batch_sizes)
    return out.finish({
        "tokens_per_s": tps,
        "first_token_ms": ttft,
        "new_tokens": new_tokens, "forward_tokens": fed,
        "kv_cache_speedup": round(tps["fp32"] / tps["fp32_no_kv"], 3),
        "int8_speedup": round(tps["int8"] / tps["fp32"], 3),
        "int8w_speedup": round(tps["int8w"] / tps["fp32"], 3),
        "int4w_vs_int8w_speedup": round(tps["int4w"] / tps["int8w"], 3),
        "bf16_speedup": round(tps["bf16"] / tps["fp32"], 3),   # 批 1 解码：AMX 也不加速，见文件头
        "bf16_prefill_speedup": round(ttft["fp32"] / ttft["bf16"], 3),
        **({"bf16_prefill_speedup_native": round(ttft["fp32"] / ttft["bf16"], 3)} if models.cpu_has_bf16() else {}),
        # 只有一个线程可用时 config_table 不出 fp32_1thread 这一行：没得比，记 None 而不是编一个 1.0
        "thread_speedup": round(tps["fp32"] / tps["fp32_1thread"], 3) if "fp32_1thread" in tps else None,
        "batch_throughput_gain": round(tps[f"fp32_bs{top_bs}"] / tps["fp32"], 3) if top_bs > 1 else None,
        "batch_first_token_slowdown": round(ttft[f"fp32_bs{top_bs}"] / ttft["fp32"], 3) if top_bs > 1 else None,
        "perplexity": ppl,
        "int8_ppl_delta": round(ppl["int8"] - ppl["fp32"], 4),
        "int8_sensitivity": scan, "int8_kept_fp32": keep,
        "int8_ppl_delta_pct": round(100 * (ppl["int8"] / ppl["fp32"] - 1), 2),
        "size_mb": sizes,
    }, summary=f"KV 缓存 {tps['fp32'] / tps['fp32_no_kv']:.2f}x，int8 {tps['int8'] / tps['fp32']:.2f}x"
               f"（困惑度 {ppl['fp32']:.2f}→{ppl['int8']:.2f}），bf16 {tps['bf16'] / tps['fp32']:.2f}x，"
               f"fp32 {tps['fp32']:.1f} tok/s，首 token {ttft['fp32']:.0f} ms", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
