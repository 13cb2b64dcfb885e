"""被 kill 也不坏的检查点：先写临时目录、写完再改名；续训时跳过损坏的检查点，改用更早的完好的一个。

只有第 1 课 03 的脚手架用它（run.import_sibling(__file__, "_checkpoint") 加载），所以放在这一课旁边，不在 common/。

为什么要这样：transformers 的 Trainer 直接往 checkpoint-N/ 里写。进程在写 model.safetensors 的半途被杀
（OOM killer、抢占式实例、Ctrl-C 两次），留下的 checkpoint-N/ 看起来是"最后一个检查点"，--resume 选中它，
然后 SafetensorError 崩溃。更糟的是 save_total_limit 会在新检查点写完后删掉旧的——两件事叠在一起，
一次不巧的 kill 就能让你一个可用的检查点都不剩。

做法（POSIX 上 rename 是原子的）：
  1. 保存 step N：先建 tmp-checkpoint-N/，再放一个名为 checkpoint-N 的符号链接指向它——Trainer 的目录名是写死的，
     链接把它的全部写入（权重、优化器、随机数状态、trainer_state.json）引进临时目录；
  2. Trainer 写完（包括按 save_total_limit 删旧检查点）后，删掉链接、把 tmp-checkpoint-N 改名成 checkpoint-N。
     于是任何时刻都成立：叫 checkpoint-N 的真目录一定是完整的；
  3. 续训（last_intact）：链接 = 没写完的保存 → 删；tmp-checkpoint-N 若已完整（在删旧与改名之间被杀）→ 补做改名；
     否则丢弃。再从新到旧逐个检查 checkpoint-N（trainer_state.json 能读、step 对得上，safetensors 头与文件长度一致，
     .pt/.pth 的 zip 校验和正确），坏的改名为 damaged-checkpoint-N 留作证据，日志说明跳过了谁、为什么。
只防进程被杀（写进页缓存的数据不会丢）；防断电还要 fsync，代价是每次保存多等一次刷盘，这里没有做。
多进程（DDP/DeepSpeed）时每个 rank 都往同一个目录写，链接技巧不适用：退回 Trainer 原来的写法，只靠续训时的检查。
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

PREFIX = "checkpoint"   # Trainer 写死的目录名前缀：checkpoint-<global_step>
# 三种目录各一个正则：完整的、正在写的（临时）；只认纯数字步号，别的同名前缀目录（checkpoint-best）不碰
_STEP = re.compile(rf"^{PREFIX}-(\d+)$")
_TMP = re.compile(rf"^tmp-{PREFIX}-(\d+)$")


def _remove(p: Path) -> None:
    """删一个路径，不论是链接、文件还是目录：链接必须先判断，否则 rmtree 会顺着链接删到临时目录里去。"""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _safetensors_problem(f: Path) -> str | None:
    """safetensors 文件是否完整：8 字节头长 + JSON 头 + 数据区，数据区长度必须等于头里记录的最大偏移。"""
    size = f.stat().st_size
    # 只读头部、不加载张量：几 GB 的权重也是毫秒级检查；截断发生在写数据区时，头部完好而长度对不上
    if size < 8:
        return f"{f.name} 只有 {size} 字节"
    with f.open("rb") as fh:
        # 格式规定：开头 8 字节是小端无符号 64 位整数，等于紧随其后的 JSON 头的字节数
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            return f"{f.name} 头长度 {n} 超出文件大小 {size}（文件被截断）"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return f"{f.name} 头不是合法 JSON（文件被截断或损坏）"
    # 数据区的结尾 = 所有张量里最大的结束偏移；__metadata__ 不是张量，没有 data_offsets
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{f.name} 应有 {8 + n + end} 字节，实际 {size}（文件被截断）"
    return None


def problem(ckpt: str | Path) -> str | None:
    """一个检查点目录是否完整可续训；完整返回 None，否则返回一句原因。"""
    d = Path(ckpt)
    m = _STEP.match(d.name)
    state = d / "trainer_state.json"
    # Trainer 最后才写 trainer_state.json：没有它，说明保存在中途被打断
    if not state.is_file():
        return "没有 trainer_state.json（保存没有写完）"
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except ValueError:
        return "trainer_state.json 不是合法 JSON（写到一半）"
    # 目录名与记录的步数不符：多半是手工拷贝/改名弄混了，续训会从错误的步数接着数
    if m and step != int(m.group(1)):
        return f"trainer_state.json 记录第 {step} 步，与目录名不符"
    # *.safetensors 也匹配 PEFT 的 adapter_model.safetensors：LoRA 训练的检查点一样查；分片的大模型另有 *.index.json
    weights = sorted(d.glob("*.safetensors"))
    if not weights and not any(d.glob("*.safetensors.index.json")):
        return "没有 .safetensors 权重"
    for f in weights:
        why = _safetensors_problem(f)
        if why:
            return why
    # 优化器 / 调度器 / 随机数状态是 torch.save 的 zip 存档：截断后 zip 的中央目录（在文件末尾）就没了，
    # testzip 再逐个核对 CRC，抓住"长度对、内容坏"的情况
    for f in sorted([*d.glob("*.pt"), *d.glob("*.pth")]):
        if zipfile.is_zipfile(f):
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"{f.name} 读不了（{type(e).__name__}）"
            if bad:
                return f"{f.name} 里的 {bad} 校验和不对"
        elif f.stat().st_size == 0:
            return f"{f.name} 是空文件"
        else:
            return f"{f.name} 不是完整的 torch 存档（zip 结构不全，多半被截断）"
    return None


def last_intact(run_dir: str | Path, log=None) -> str | None:
    """续训用：收拾被打断的保存，返回最新的完好检查点路径（没有则 None）；跳过了谁、为什么都写进日志。"""
    run = Path(run_dir)
    say = (log.warning if log else print)   # 用 warning：跳过检查点是学生必须看到的事，不能埋在 INFO 里
    if not run.is_dir():
        return None
    # 1. 保存半途被杀留下的东西：链接删掉；临时目录完整就补做改名，否则丢弃
    for p in sorted(run.iterdir()):
        if _STEP.match(p.name) and p.is_symlink():
            p.unlink()
            say(f"{p.name}: 是上次保存到一半的临时链接，已删除")
    for p in sorted(run.iterdir()):
        m = _TMP.match(p.name)
        if not m or not p.is_dir():
            continue
        final = run / f"{PREFIX}-{m.group(1)}"
        why = problem(p)
        # 临时目录完整、同名正式目录却已存在：以已发布的那份为准，临时的丢掉（下面 else 分支）
        if why is None and not final.exists():
            os.rename(p, final)
            say(f"{p.name}: 保存已写完、只差最后的改名时被打断，补做改名为 {final.name}")
        else:
            shutil.rmtree(p)
            say(f"{p.name}: 上次保存没写完（{why or '同名检查点已存在'}），已丢弃")
    # 2. 从新到旧找第一个完好的；坏的不删而是改名：留下证据好排查（磁盘满？被 kill？），又不会再被选中
    # 按步号的数值排序而不是按名字：字符串排序里 checkpoint-10 排在 checkpoint-9 前面，会选错"最新"
    ckpts = sorted((p for p in run.iterdir() if _STEP.match(p.name) and p.is_dir()),
                   key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)
    for p in ckpts:
        why = problem(p)
        if why is None:
            return str(p)
        aside = run / f"damaged-{p.name}"
        # 上次留下的同名 damaged- 目录先删掉：os.rename 不能覆盖一个非空目录
        _remove(aside)
        os.rename(p, aside)
        say(f"{p.name} 已损坏（{why}），跳过它、改用更早的检查点；原目录改名为 {aside.name} 留作排查")
    return None


def clear(run_dir: str | Path) -> None:
    """从头训练前清掉旧的检查点、临时目录和损坏目录（免得和这次的混在一起被"续"上）。"""
    run = Path(run_dir)
    if not run.is_dir():
        return
    # 只删这三种名字：输出目录里还有 metrics.json、图、best_model/，它们属于上一次运行的结果，由新运行覆盖
    for p in run.iterdir():
        if _STEP.match(p.name) or _TMP.match(p.name) or p.name.startswith(f"damaged-{PREFIX}-"):
            _remove(p)


def atomic(trainer_cls: type) -> type:
    """给一个 Trainer 类（Trainer、SFTTrainer、DPOTrainer……）加上"先写临时目录再改名"的检查点保存。"""

    class AtomicCheckpoints(trainer_cls):
        def _save_checkpoint(self, model, trial):  # noqa: ANN001 - 与 transformers 的签名一致
            """覆盖 Trainer 的保存：写进临时目录，全部写完（含删旧检查点）后一次改名发布。"""
            # 多进程时各 rank 都往同一目录写、不在同一时刻结束，链接技巧会互相踩：退回原来的写法
            if self.args.world_size > 1 or not self.args.should_save:
                return super()._save_checkpoint(model, trial)
            # 与 Trainer 自己算的是同一个目录：超参搜索时是 output_dir/run-<trial> 子目录，
            # 第一次保存前还不存在（下面 mkdir）
            run = Path(self._get_output_dir(trial=trial))
            final = run / f"{PREFIX}-{self.state.global_step}"
            staging = run / f"tmp-{final.name}"
            run.mkdir(parents=True, exist_ok=True)
            # 上次在这一步保存到一半留下的临时目录：清掉重来，否则下面 mkdir 报 FileExistsError
            _remove(staging)
            _remove(final)                      # 同一步重存（续训后再次到达这一步）：新的替换旧的
            staging.mkdir()
            final.symlink_to(staging.name)      # 相对链接：整个输出目录挪走也不断
            try:
                # Trainer 照旧往写死的 checkpoint-N 路径写，实际落进链接指向的临时目录；trainer_state.json 在最后写，
                # 按 save_total_limit 删旧检查点也在这个调用里
                super()._save_checkpoint(model, trial)
            except BaseException:
                # 保存失败（磁盘满、Ctrl-C）：撤掉链接，留下的临时目录由下一次 last_intact 判断去留
                final.unlink()
                raise
            final.unlink()
            os.rename(staging, final)           # 原子：之前别人看到的是链接（= 没写完），之后是完整目录

    # 改名：日志与报错里看到的是 AtomicSFTTrainer，一眼看出不是原版 Trainer
    AtomicCheckpoints.__name__ = AtomicCheckpoints.__qualname__ = f"Atomic{trainer_cls.__name__}"
    return AtomicCheckpoints
