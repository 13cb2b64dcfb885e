"""QLoRA 的三块基石，从零写一遍再和 bitsandbytes 对账：NF4 量化、分块 absmax、双重量化，外加梯度检查点。

1. NF4（4-bit NormalFloat）：预训练权重近似正态分布，所以 16 个码值取标准正态的分位数（而不是等间距），
   每个码值覆盖同样多的权重；每 64 个权重一块、各自除以块内 absmax 归一到 [-1, 1]，再取最近的码值。
   对照：同样分块的等间距 int4（-7..7）与 int8（-127..127）。在模型真实的 Linear 权重上量重建误差（MSE）。
2. 与 bitsandbytes 对账：bitsandbytes.functional.quantize_4bit / dequantize_4bit（quant_type="nf4"）
   在同样的权重上得到的码本、4-bit 码、反量化张量必须和我们的一致。
3. 每参数比特：4 + 32/64 = 4.5（每块一个 fp32 absmax）；双重量化把 absmax 再按 256 个一块量化成 8 bit：
   4 + 8/64 + 32/(64·256) ≈ 4.127。再用 BitsAndBytesConfig 真的 4-bit 加载模型，数 Linear4bit 里存了多少字节来核对。
4. 梯度检查点：同一个训练步（前向 + 反向）开/关 gradient checkpointing 的峰值内存（common.train.PeakMemory 量）。

运行：
  python lesson2_qlora_ptuning/01_qlora_intro/qlora_theory.py            # smollm2-135m（210 个 Linear），CPU
  python lesson2_qlora_ptuning/01_qlora_intro/qlora_theory.py --smoke    # tiny-llama
  python lesson2_qlora_ptuning/01_qlora_intro/qlora_theory.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --config configs/lesson2/qlora_theory_gpu.yaml                       # GPU：峰值内存用 CUDA 精确统计

你会看到：同样分块下 NF4 的重建 MSE 明显低于等间距 int4（分位数码值把码位花在权重最密的零附近），int8 的误差又远小于
两种 4-bit；从零写的 NF4 与 bitsandbytes 逐码一致（只有恰好落在两个码值中点的个别元素舍入方向不同），码相同处反量化值
也一致；4-bit 加载后数出的 bit/参数与公式（4.5，双重量化 4.127）对得上；梯度检查点降低一步训练的峰值内存（每层只存
输入、反向时重算），省多少取决于激活在峰值里的占比：tiny-llama 上激活占大头、省得多，smollm2 上权重与优化器状态占大头、
省得少。bitsandbytes 0.50 的 CPU 反量化内核在行长不是 64 倍数时（tiny 的 down_proj）算错，脚本会指出
（GPU 没有这个问题）。图：nf4_levels.png（权重分布与两种 4-bit 码值）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.8 分钟，2.0 GB，结论 7/7 成立
  ✓ NF4 的分位数码值比等间距 int4 重建误差小：MSE NF4 / int4：0.6882（≤ 0.8）
  ✓ int8 的重建误差远小于 4-bit：MSE int8 / NF4：0.004387（≤ 0.05）
  ✓ 从零写的 NF4 与 bitsandbytes 逐码一致：4-bit 码相同的比例：1（≥ 0.9999）
  ✓ 码相同处反量化值也与 bitsandbytes 一致：最大绝对差：1e-06（≤ 1e-05）
  ✓ 双重量化减少存储：4-bit 加载后实测 bit/参数，双重量化 / 不双重量化：0.9171（≤ 0.93）
  ✓ 公式与 4-bit 加载后数出的字节对得上：|实测 - 公式| bit/参数（双重量化）：0（≤ 0.01）
  ✓ 梯度检查点降低峰值内存：一步训练 开 / 不开：0.8948（≤ 0.95）
<!-- /results -->
"""
import copy
import math
from dataclasses import dataclass

from common import cli, models, run, train
from common.errors import UserError

plots = run.import_sibling(__file__, "_plot")   # 图（nf4_levels.png）放在旁边，这里留下量化本身


@dataclass
class Args(cli.CommonArgs):
    # choices 都在 bitsandbytes quantize_4bit 接受的分块大小之内：给别的值，第 3 步对账时它直接报 invalid blocksize
    blocksize: int = cli.arg(64, "分块大小：每块一个 absmax（QLoRA 论文与 bitsandbytes 默认 64）",
                             choices=[64, 128, 256, 512, 1024, 2048, 4096])
    # 只进第 4 步的公式：bitsandbytes 的双重量化把 absmax 的分块写死为 256（quantize_4bit 里 blocksize=256），
    # 改了它，实测的 bit/参数不会跟着变
    dq_blocksize: int = cli.arg(256, "双重量化时 absmax 常数的分块大小（论文：256 个一块量化成 8 bit）", min=2)
    max_matrices: int = cli.arg(0, "只取前多少个 Linear 权重算误差；0 = 全部", min=0)
    batch_size: int = cli.arg(2, "梯度检查点实验的批大小", min=1)
    seq_len: int = cli.arg(256, "梯度检查点实验的序列长度：激活内存 ∝ 批 × 长度 × 层数", min=8, max=4096,
                           why="光 logits 就占 批 × 长度 × 词表 × 4 字节：smollm2 批 2 × 4096 已 1.6 GB，还没算激活")
    data: str = cli.arg(None, "本脚本不读数据文件：量化误差用模型自己的权重，检查点实验用随机 token")

    # tiny-llama 与 smollm2 同为 Llama 架构，冒烟与默认模式遇到的是同一套 Linear（q/k/v/o、gate/up/down）；
    # 它的 intermediate_size 是 352，不是 64 的倍数，冒烟也会走到 bitsandbytes CPU 内核出错的那条分支
    smoke_model = "tiny-llama"

    def __post_init__(self) -> None:
        if self.data:   # CommonArgs 的 --data：给了却悄悄不用，学生会以为结果来自自己的数据
            raise UserError(f"--data {self.data}: 这个脚本不读数据文件"
                            "（量化误差用模型自己的权重，检查点实验用随机 token）")


# 极小模型每层激活很小：加大批和长度，让激活在峰值里占大头，检查点的效果才量得出来
SMOKE = dict(batch_size=4, seq_len=512)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里、同一批权重上测
CLAIMS = [
    run.Claim("NF4 的分位数码值比等间距 int4 重建误差小：MSE NF4 / int4", "nf4_mse / int4_mse", "<=", 0.85, 0.8),
    run.Claim("int8 的重建误差远小于 4-bit：MSE int8 / NF4", "int8_mse / nf4_mse", "<=", 0.05, 0.05),
    run.Claim("从零写的 NF4 与 bitsandbytes 逐码一致：4-bit 码相同的比例", "code_agreement", ">=", 0.9999, 0.9999),
    run.Claim("码相同处反量化值也与 bitsandbytes 一致：最大绝对差", "dequant_max_diff", "<=", 1e-5, 1e-5),
    run.Claim("双重量化减少存储：4-bit 加载后实测 bit/参数，双重量化 / 不双重量化",
              "measured_bits_per_param_double_quant / measured_bits_per_param", "<=", 0.93, 0.93),
    run.Claim("公式与 4-bit 加载后数出的字节对得上：|实测 - 公式| bit/参数（双重量化）",
              "abs(measured_bits_per_param_double_quant - bits_per_param_double_quant)", "<=", 0.01, 0.01),
    # 冒烟门槛反而更严（0.8 < 0.95）：tiny-llama 上激活占峰值的大头、检查点省得多；
    # smollm2 上激活占比小，参考运行只到 0.89（见文档）
    run.Claim("梯度检查点降低峰值内存：一步训练 开 / 不开", "peak_mem_mb_ckpt / peak_mem_mb_no_ckpt", "<=", 0.8, 0.95),
]


def nf4_codebook():
    """QLoRA 附录的构造：正半轴取 8 个、负半轴取 7 个标准正态分位数，加上精确的 0，再除以最大值归一化。

    offset = 0.9677 = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2：不取 0.5→1 的两端（Φ⁻¹(1) = ∞），让两端的码值有限。
    正半轴多一个码值（非对称），这样 0 能被精确表示（padding、被剪枝的权重都是 0）。
    """
    import torch

    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    # 分位数用 float64 算、最后才转 fp32：Φ⁻¹ 在尾部（offset 附近）斜率大，输入的舍入会被放大，
    # 而第 3 步要求与 bitsandbytes 写死的码本差 < 1e-6。
    # [:-1] 去掉 0.5 那一点：Φ⁻¹(0.5) = 0，精确的 0 在下面只放一次，否则 0 重复、码值不再是 16 个
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])   # 8 个正值
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 个负值
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    # 正负两端都是 ±Φ⁻¹(offset)，除以最大值后码本恰好铺满 [-1, 1]：
    # 块内绝对值最大的那个元素（归一化后 = ±1）能被精确表示
    return (v / v.max()).float()


def blockwise(w, blocksize: int):
    """把权重展平、按 blocksize 分块（末块补 0），返回 (块矩阵, 每块 absmax, 原元素数)。"""
    import torch

    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    # 末块补 0 而不是丢掉：0 不改变 absmax（取的是绝对值最大），返回的 n 让调用方把补的元素切掉
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    # clamp_min：全 0 的块（例如被剪成 0 的权重）absmax = 0，不夹住就是 0/0 = NaN，一路传进 MSE
    return blocks, blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12), n


def quant_nf4(w, code, blocksize: int):
    """NF4：块内 absmax 归一化到 [-1,1]，取最近的码值。返回 (码 uint8, absmax, 反量化张量)。"""
    import torch

    blocks, absmax, n = blockwise(w, blocksize)
    # 暴力求最近码值：每个元素对 16 个码值各算一个距离，临时张量是这个矩阵的 16 倍；
    # 逐矩阵调用，内存峰值只受最大的那个 Linear 限制
    idx = (blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(dim=-1)   # 最近码值的下标 0..15
    # [:n] 切掉补齐的元素才能 view_as(w) 还原形状；补的 0 在 NF4 里误差为 0，留着也会把 MSE 摊薄
    deq = (code[idx] * absmax).reshape(-1)[:n].view_as(w)
    return idx.reshape(-1)[:n].to(torch.uint8), absmax.reshape(-1), deq


def quant_linear(w, bits: int, blocksize: int):
    """等间距对称整数量化（int4: -7..7，int8: -127..127），同样分块 absmax，返回反量化张量。"""
    blocks, absmax, n = blockwise(w, blocksize)
    # 对称范围 ±qmax（int4 取 -7..7，不用 -8）：舍掉一个码位，换来 0 两侧对称、absmax 正好映射到端点
    qmax = 2 ** (bits - 1) - 1
    q = (blocks / absmax * qmax).round().clamp(-qmax, qmax)
    return (q / qmax * absmax).reshape(-1)[:n].view_as(w)


def linear_weights(model, limit: int) -> list:
    """解码层里全部 nn.Linear 的权重（不含 embedding / lm_head：bitsandbytes 4-bit 加载也不量化它们）。"""
    import torch

    ws = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    if not ws:
        raise UserError(f"--model {model.config.name_or_path}: 没有找到 nn.Linear 层，无法演示权重量化")
    return ws[:limit] if limit else ws


def compare_with_bnb(ws, code, blocksize: int, log) -> dict:
    """在同样的权重上跑 bitsandbytes 的 NF4，逐元素对比码本、4-bit 码、absmax 与反量化值。"""
    import bitsandbytes.functional as bnbF
    import torch

    same = total = kernel_bad = 0
    max_diff = absmax_diff = 0.0
    for name, w in ws:
        # 与 quant_nf4 吃同一份 fp32 连续张量：bitsandbytes 的内核按连续内存读；
        # 输入的 dtype 不同，量化前就多一层舍入，对不上账的原因会混在一起
        w = w.detach().float().contiguous()
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        p = packed.reshape(-1)   # bitsandbytes 把两个 4-bit 码装进一个字节：前一个元素在高 4 位
        # [:w.numel()]：元素个数为奇数时，最后一个字节的低 4 位是空的，要切掉
        bnb_idx = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:w.numel()]
        idx, absmax, deq = quant_nf4(w, code, blocksize)
        eq = bnb_idx == idx   # 不一致的只会是恰好落在两个码值中点上的元素（浮点舍入方向不同）
        same += eq.sum().item()
        total += w.numel()
        # absmax 也要对：码相同而 absmax 不同，反量化值照样不同
        absmax_diff = max(absmax_diff, (state.absmax - absmax).abs().max().item())
        # 分块是在展平后的张量上连续切的；按 (块数, blocksize) 的形状反量化，就是逐块 code[i]·absmax
        # 浅拷贝只为改 shape：原 state 在下面还要按原形状再反量化一次，不能就地改
        flat_state = copy.copy(state)
        if w.numel() % blocksize == 0:
            flat_state.shape = torch.Size([w.numel() // blocksize, blocksize])
        bnb_deq = bnbF.dequantize_4bit(packed, flat_state).reshape(w.shape)
        # 只在码相同的位置比：码不同的个别元素差一整个码距，会把要查的'同码同值'淹没
        max_diff = max(max_diff, (bnb_deq - deq).reshape(-1)[eq.reshape(-1)].abs().max().item())
        # 按原形状反量化：bitsandbytes 0.50 的 CPU 内核假设每行长度是 blocksize 的整数倍（GPU 内核按展平处理）
        if (bnbF.dequantize_4bit(packed, state) - deq).abs().max().item() > 1e-5:
            kernel_bad += 1
            if kernel_bad == 1:
                log.info(f"注意：{name} {tuple(w.shape)} 每行 {w.shape[-1]} 个元素不是 {blocksize} 的整数倍，"
                         "bitsandbytes 的 CPU 反量化内核按行处理算错了（码与 absmax 都一致；按展平形状反量化则一致）")
    # 码本对所有张量都一样（NF4 是写死的 16 个值），取循环里最后一个 state 的即可
    code_diff = (state.code.float() - code).abs().max().item()
    agree = same / total
    log.info(f"与 bitsandbytes 对账：码本最大差 {code_diff:.2e}，4-bit 码一致 {agree:.6%}，"
             f"absmax 最大差 {absmax_diff:.2e}，码相同处反量化最大差 {max_diff:.2e}")
    return {"codebook_max_diff": code_diff, "code_agreement": agree, "absmax_max_diff": absmax_diff,
            "dequant_max_diff": max_diff, "bnb_cpu_kernel_mismatch_matrices": kernel_bad}


def double_quant_bits(blocksize: int, dq_blocksize: int) -> tuple[float, float]:
    """每参数比特：4 bit 码 + 每块 fp32 absmax；双重量化后 absmax 变 8 bit，每 dq_blocksize 个再配一个 fp32 常数。"""
    # 默认 64 / 256 时就是文档里的 4.5 与 ≈4.127。不含每张量一个的二级 offset（measured_bits 里
    # 那 +4 字节）：摊到一个矩阵的全部参数上，远小于第 4 步 0.01 bit 的门槛
    return 4 + 32 / blocksize, 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def measured_bits(args: Args, double_quant: bool, log) -> float:
    """真的 4-bit 加载模型，数 Linear4bit 里实际存储的字节（码 + absmax + 二级常数）÷ 原参数个数。"""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    # BitsAndBytesConfig 没有分块参数：加载总用 bitsandbytes 的默认 64（Params4bit），
    # 所以下面要核对 st.blocksize，--blocksize 改了只会在日志里提醒
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32)
    # 4-bit 在加载时逐层量化，设备只能由 device_map 在加载时给定（models.load 对量化模型不再 .to()）
    model, _ = models.load_args(args, quantization_config=qcfg,
                                device_map="cuda" if torch.cuda.is_available() else "cpu")
    bits = params = consts = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            st = m.weight.quant_state
            if st.blocksize != args.blocksize:
                log.info(f"注意：bitsandbytes 加载用的分块是 {st.blocksize}（不是 --blocksize {args.blocksize}）")
            # m.weight 存的是打包后的字节（两个码一字节），原参数个数要从 quant_state.shape 取，否则少算一半
            params += math.prod(st.shape)
            nbytes = m.weight.numel() * m.weight.element_size() + st.absmax.numel() * st.absmax.element_size()
            if st.nested:   # 二级：absmax 的 absmax（fp32）+ 减掉的均值 offset（1 个 fp32）
                nbytes += st.state2.absmax.numel() * st.state2.absmax.element_size() + 4
                consts += st.state2.code.numel() * 4
            consts += st.code.numel() * 4
            bits += nbytes * 8
    del model
    if not params:
        raise UserError("bitsandbytes 4-bit 加载后没有 Linear4bit 层")
    # 码表（NF4 的 16 个值、8-bit 动态码的 256 个值）是所有张量都一样的常数，不随参数量增长，不计入
    log.info(f"4-bit 加载（double_quant={double_quant}）：{params:,d} 个被量化参数，实测 {bits / params:.4f} bit/参数"
             f"（另有每张量一份的码表 {consts / 2**10:.1f} KB，不计入）")
    return bits / params


def step_peak(model, batch, ckpt: bool, device) -> float:
    """一个训练步（前向 + 反向，梯度写进 .grad）的峰值内存增量（MB）。优化器状态两种情况一样大，不放进来。"""
    if ckpt:   # 非重入实现：只存每层输入，反向时逐层重算前向
        # transformers 5 的名字：旧的 gradient_checkpointing_enable 已是弃用别名（v6 删除），会打 FutureWarning
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.train()
    # set_to_none 释放上一轮的 .grad：两种设置都从'没有梯度'开始，梯度的分配都算进这一轮的峰值
    model.zero_grad(set_to_none=True)
    # 上一轮释放的堆先还给系统：否则这一轮的分配复用它们、RSS 不涨，CPU 上量出的增量偏小
    train.release_memory()
    with train.PeakMemory(device) as mem:
        # labels 就是输入：模型内部移位算下一个 token 的损失。use_cache=False：训练用不到 KV 缓存，
        # 开检查点时 transformers 也会强制关掉并警告；两种设置显式一致，比的只有检查点
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return mem.peak_mb


def reconstruction_mse(ws, code, blocksize: int) -> tuple[dict, int]:
    """三种 4/8-bit 格式在同一批权重上的重建均方误差（按元素总数平均，大矩阵权重大）。

    分块 absmax 完全相同，唯一的差别是码值放在哪：这样 MSE 的差只能来自"分位数 vs 等间距"。
    """
    sq = {"nf4": 0.0, "int4": 0.0, "int8": 0.0}
    numel = 0
    for _, w in ws:
        w = w.detach().float()   # GPU 上加载的是 bf16：误差要按 fp32 算，否则 int8 的 1e-8 级误差被舍入淹没
        sq["nf4"] += (quant_nf4(w, code, blocksize)[2] - w).pow(2).sum().item()
        sq["int4"] += (quant_linear(w, 4, blocksize) - w).pow(2).sum().item()
        sq["int8"] += (quant_linear(w, 8, blocksize) - w).pow(2).sum().item()
        numel += w.numel()
    return {k: v / numel for k, v in sq.items()}, numel


def grad_ckpt_peaks(model, tok, args: Args) -> tuple[float, float]:
    """同一批随机 token、同一个模型：一步训练的峰值内存（不开检查点, 开检查点），单位 MB。

    先开后关：CPU 上量的是进程 RSS，分配器只涨不退，后测的一方天然吃亏，让"不开"后测就不会夸大检查点的收益。
    """
    import torch

    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(args.seed)   # 独立的生成器：批的内容不受前面步骤用掉多少随机数影响
    # 先在 CPU 上生成再搬过去：上面的 Generator() 是 CPU 生成器，不能直接拿来在 CUDA 上采样
    batch = torch.randint(0, len(tok), (args.batch_size, args.seq_len), generator=gen).to(dev)
    step_peak(model, batch, True, dev)   # 预热一次：第一次前向会分配一次性的缓冲区，不算进对比
    peak_ckpt = step_peak(model, batch, True, dev)
    peak_full = step_peak(model, batch, False, dev)
    return peak_full, peak_ckpt


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. NF4 码本：16 个标准正态分位数（从零构造）；码值放在权重密的地方，同样 4 bit 误差更小
    code = nf4_codebook()
    out.log.info("NF4 码本：" + " ".join(f"{c:+.4f}" for c in code.tolist()))

    # 2. 在模型真实的 Linear 权重上比较 NF4 / int4 / int8 的重建误差（同样的分块 absmax）：
    #    随机正态矩阵会让 NF4 显得更好，真实权重有离群值，才是它要面对的分布
    model, tok = models.load_args(args, for_training=True)   # CPU：fp32 主权重；GPU：bf16（量化误差仍按 fp32 算）
    ws = linear_weights(model, args.max_matrices)
    mse, numel = reconstruction_mse(ws, code, args.blocksize)
    out.log.info(f"{len(ws)} 个 Linear、{numel:,d} 个权重的 MSE：NF4 {mse['nf4']:.3e}，int4 {mse['int4']:.3e}，"
                 f"int8 {mse['int8']:.3e}（NF4 比 int4 低 {1 - mse['nf4'] / mse['int4']:.1%}）")

    # 3. 与 bitsandbytes 对账：码本、每个 4-bit 码、反量化值。只比 MSE 证明不了"我们写的就是 QLoRA 的 NF4"
    check = compare_with_bnb(ws, code, args.blocksize, out.log)
    # 门槛与 CLAIMS 一致；码的一致率不要求 100%：恰好落在两个码值中点的元素，两边浮点舍入方向可以不同
    matches = (check["codebook_max_diff"] < 1e-6 and check["code_agreement"] > 0.9999
               and check["absmax_max_diff"] < 1e-6 and check["dequant_max_diff"] < 1e-5)

    # 4. 每参数比特：公式 vs 4-bit 加载后实际存储（公式漏算一项常数，实测就对不上 4.127）
    bpp, bpp_dq = double_quant_bits(args.blocksize, args.dq_blocksize)
    # 两次都从磁盘重新 4-bit 加载，与上面 fp32 的 model 无关：数的是 bitsandbytes 真正存下的字节
    meas, meas_dq = measured_bits(args, False, out.log), measured_bits(args, True, out.log)
    out.log.info(f"bit/参数：公式 {bpp:.3f} / 双重量化 {bpp_dq:.3f}；实测 {meas:.3f} / {meas_dq:.3f}")

    # 5. 梯度检查点：QLoRA 把权重压到 4 bit 之后，激活成了显存的大头，检查点省的正是它
    peak_full, peak_ckpt = grad_ckpt_peaks(model, tok, args)
    ratio = peak_ckpt / peak_full
    # CPU 的 RSS 含分配器缓存，只在同一进程里前后比较才有意义；CUDA 的 max_memory_allocated 是精确值
    where = "CUDA 精确统计" if next(model.parameters()).device.type == "cuda" else "CPU 进程 RSS 采样"
    out.log.info(f"一步训练（batch {args.batch_size} × {args.seq_len}）峰值内存：不开检查点 {peak_full:.0f} MB，"
                 f"开 {peak_ckpt:.0f} MB（{ratio:.2f} 倍）；{where}")

    # 6. 图：归一化后的权重分布 + NF4 / int4 码值
    # 画按块 absmax 归一化后的值：码值定义在 [-1, 1] 上，原始权重的刻度和码本对不上
    blocks, absmax, _ = blockwise(ws[0][1], args.blocksize)
    plots.plot_levels(out, ws[0][0], (blocks / absmax).reshape(-1).cpu().numpy(), code, mse)
    return out.finish({
        "nf4_mse": mse["nf4"], "int4_mse": mse["int4"], "int8_mse": mse["int8"],
        "nf4_vs_int4_error_reduction": round(1 - mse["nf4"] / mse["int4"], 4),
        "matches_bitsandbytes": bool(matches), **check,
        "bits_per_param": round(bpp, 4), "bits_per_param_double_quant": round(bpp_dq, 4),
        "measured_bits_per_param": round(meas, 4), "measured_bits_per_param_double_quant": round(meas_dq, 4),
        "grad_ckpt_peak_mem_ratio": round(ratio, 4), "peak_mem_mb_no_ckpt": round(peak_full, 1),
        "peak_mem_mb_ckpt": round(peak_ckpt, 1), "linear_matrices": len(ws), "quantized_weights": numel,
        "codebook": [round(c, 6) for c in code.tolist()],
    }, summary=f"NF4 MSE {mse['nf4']:.2e} < int4 {mse['int4']:.2e}；与 bitsandbytes 一致={matches}；"
               f"bit/参数 {bpp:.3f} -> {bpp_dq:.3f}（实测 {meas:.3f} / {meas_dq:.3f}）；"
               f"梯度检查点峰值内存 ×{ratio:.2f}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
