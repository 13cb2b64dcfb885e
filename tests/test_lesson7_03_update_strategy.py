"""第 7 课 03：增量更新只重算变了的块；10 次随机 SIGKILL 后重跑，索引与干净重建一致、无重复无丢失、审计日志一致。"""
import json

from common import run
from tests.conftest import REPO, assert_claims, assert_user_error

SCRIPT = "lesson7_hybrid_rag/03_incremental_updates/update_strategy.py"
KILL = run.import_sibling(REPO / SCRIPT, "_kill_child")


def _write_lines(path, n: int, crash_at: int) -> int:
    """子进程里：每写一行之前 tick 一次；返回数到的写动作数。"""
    switch = KILL.KillSwitch(crash_at)
    with open(path, "a", encoding="utf-8") as f:
        for i in range(n):
            switch.tick()
            f.write(f"{i}\n")
            f.flush()
    return switch.ops


def test_kill_switch_stops_the_child_right_before_the_nth_write(tmp_path):
    """不杀：结果经 JSON 带回、5 行都在；第 3 次写之前自杀：run_in_child 返回 None，磁盘上只有前 2 行。"""
    done, killed = tmp_path / "done.txt", tmp_path / "killed.txt"
    assert KILL.run_in_child(_write_lines, done, 5, 0) == 5
    assert KILL.run_in_child(_write_lines, killed, 5, 3) is None
    assert done.read_text().split() == ["0", "1", "2", "3", "4"] and killed.read_text().split() == ["0", "1"]


def test_incremental_and_crash_consistency(tmp_path, run_script):
    # 独立进程里跑：脚本要 fork 子进程做更新，pytest 进程里先跑过的测试留下的线程会让 fork 出的子进程死锁
    run_script(SCRIPT, "--smoke", "--output-dir", str(tmp_path), timeout=900, check=True)
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    rounds = {r["round"]: r for r in m["rounds"]}
    # 只重新向量化新增/改动的块：远少于总块数；没变化的更新一个都不算；定期全量重建全部重算
    assert 0 < m["reembedded"] < 0.3 * m["total_chunks"], m
    assert m["reembedded"] == rounds["incremental"]["num_added"]
    assert rounds["incremental"]["num_deleted"] > 0 and rounds["no_change"]["reembedded"] == 0
    assert rounds["scheduled_rebuild"]["reembedded"] == rounds["scheduled_rebuild"]["chunks"]
    # 崩溃安全：≥10 次随机点 SIGKILL，大多数真的杀在途中；重跑后每次都与干净重建一致
    assert m["crash_trials"] >= 10 and m["killed_trials"] >= 8, m["trials"]
    assert m["consistent_after_crash"] is True, m["trials"]
    assert m["incremental_equals_rebuild"] is True
    assert all(t["consistent"] for t in m["trials"])
    # 审计日志是追加式 JSONL，每行有 time / doc_id / action / hash
    lines = [json.loads(x) for x in (tmp_path / "index_state" / "audit.jsonl").read_text().splitlines()]
    assert {"time", "doc_id", "action", "hash"} <= set(lines[0])
    assert [x["action"] for x in lines].count("commit") == 4
    assert_claims(m)


def test_bad_overlap_is_one_line_error(run_script, tmp_path):
    proc = run_script(SCRIPT, "--smoke", "--chunk-size", "100", "--chunk-overlap", "200", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--chunk-overlap")


def test_bad_embedding_model_dir_refused_before_forking(run_script, tmp_path):
    """向量模型在 fork 出的子进程里才加载：坏的本地目录要在父进程里一行拒绝，
    而不是子进程崩了、父进程一屏 RuntimeError。"""
    bad = tmp_path / "emb"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": ' + "[" * 10_000 + "]" * 10_000 + "}", encoding="utf-8")
    (bad / "model.safetensors").write_bytes(b"garbage!")
    proc = run_script(SCRIPT, "--smoke", "--embedding-model", str(bad), "--output-dir", str(tmp_path / "out"))
    assert_user_error(proc, f"{bad / 'config.json'}:1")   # common.data 的 `文件:行`，点名了给错的目录
    assert "子进程" not in proc.stderr and not (tmp_path / "out" / "metrics.json").exists()
