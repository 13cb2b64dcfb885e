"""第 5 课 02：HF 平台方式的 DPO。

TrlParser 读配方、留出偏好对 margin 由 0 变正、模型卡带元数据与指标、离线 --push 只写目录。
"""
import json

import pytest
import yaml

from common import cli
from common.errors import UserError
from tests import test_own_data_trainers
from tests.conftest import REPO, assert_claims, assert_user_error, load_script

course_log = test_own_data_trainers.course_log   # 收集课程日志的 fixture（与自有数据的测试共用一份）
PAIRS = test_own_data_trainers.PAIRS

SCRIPT = "lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py"


def test_dpo_recipe_model_card_and_offline_push(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, push=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_reward_margin", "eval_reward_accuracy", "train_loss", "model_card_path"):
        assert key in saved, key
    assert_claims(saved)
    # 训练前策略 = 参考模型，margin 恰为 0；DPO 之后留出偏好对上 chosen 的隐式奖励明显高于 rejected
    assert m["eval_reward_margin_before"] == 0 and m["eval_reward_margin"] > 0.2, m
    assert m["eval_reward_accuracy"] > m["eval_reward_accuracy_before"] + 0.3, m
    card = (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-qwen2" and "dpo" in meta["tags"] and meta["license"] == "apache-2.0"
    assert f"{m['eval_reward_margin']:.4f}" in card and "预期用途" in card and "局限" in card
    assert (tmp_path / "repo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "repo" / "dpo_hf.yaml").is_file() and (tmp_path / "repo" / "accelerate_single.yaml").is_file()
    assert m["push_status"] == "offline"   # 测试离线：不上传，只写好目录并说明


def test_recipe_is_valid_for_trl():
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    mod = load_script(SCRIPT)
    s, t, mc = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(
        args=["--config", str(mod.RECIPES / "dpo_hf.yaml"), "--output_dir", "/tmp/x", "--use_cpu", "true",
              "--bf16", "false"])
    assert t.beta == 0.1 and mc.use_peft and s.dataset_name == "data/preference/pairs.jsonl"


def test_bad_recipe_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nno_such_field: 3\n", encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--recipe", str(bad), "--output-dir", str(tmp_path / "o"), timeout=300)
    assert_user_error(proc, "--recipe")


# issue 22 第 3 组：坏配方在加载模型之前一行拒绝（点名 文件:行 或 文件: 键 或参数），不训练、不写 metrics.json
RECIPE = (REPO / "configs" / "lesson5" / "recipes" / "dpo_hf.yaml").read_text(encoding="utf-8")


def refused(tmp_path, monkeypatch, *argv: str) -> str:
    """像学生那样跑（cli.parse + main，--smoke）：必须是一行 UserError，且在加载模型之前、没有 metrics.json。"""
    import torch

    from common import models

    mod = load_script(SCRIPT)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("坏配方应在加载模型之前就被拒绝"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError) as e:
            mod.main(cli.parse(mod.Args, ["--smoke", "--output-dir", str(tmp_path / "out"), *argv]))
    finally:
        torch.set_num_threads(threads)   # 冒烟的 run.start 改了线程数，出错时没走到 finish 还原
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert not (tmp_path / "out" / "metrics.json").exists()
    return msg


def recipe(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_python_tag_in_recipe_is_not_executed_and_names_the_line(tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    p = recipe(tmp_path, RECIPE + f"extra: !!python/object/apply:os.mkdir ['{pwned}']\n")
    msg = refused(tmp_path, monkeypatch, "--recipe", str(p))
    assert msg.startswith(f"{p}:{len(RECIPE.splitlines()) + 1}: ") and "python/object" in msg, msg
    assert not pwned.exists()   # safe_load：标签不会被构造执行


def test_yaml_syntax_error_names_file_and_line(tmp_path, monkeypatch):
    p = recipe(tmp_path, "beta: 0.1\n  learning_rate: [1e-4\n")
    assert refused(tmp_path, monkeypatch, "--recipe", str(p)).startswith(f"{p}:2: YAML 无法解析")


def test_missing_dataset_names_the_recipe_key_and_path(tmp_path, monkeypatch):
    p = recipe(tmp_path, RECIPE.replace("data/preference/pairs.jsonl", "data/no_such.jsonl"))
    msg = refused(tmp_path, monkeypatch, "--recipe", str(p))
    assert msg.startswith(f"{p}: 键 dataset_name data/no_such.jsonl: 文件不存在"), msg


def test_missing_accelerate_config_names_the_flag(tmp_path, monkeypatch):
    msg = refused(tmp_path, monkeypatch, "--accelerate-config", str(tmp_path / "nope.yaml"))
    assert msg.startswith(f"--accelerate-config {tmp_path / 'nope.yaml'}: 文件不存在"), msg


@pytest.mark.parametrize("line,key,why", [
    ("beta: .nan", "beta", "必须是有限的数"), ("learning_rate: .inf", "learning_rate", "必须是有限的数"),
    ("beta: 'nan'", "beta", "必须是有限的数"), ("max_grad_norm: .nan", "max_grad_norm", "必须是有限的数"),
    ("beta: 0", "beta", "超出允许范围"), ("max_steps: -1", "max_steps", "超出允许范围"),
    ("per_device_train_batch_size: 1000000000", "per_device_train_batch_size", "超出允许范围"),
    ("beta: [1, 2]", "beta", "应是 float"), ("max_steps: 2.5", "max_steps", "应是 int"),
    ("use_peft: 7", "use_peft", "应是 bool"), ("hub_model_id: 7", "hub_model_id", "不是 int"),
])
def test_bad_numbers_and_types_in_recipe_are_refused_naming_the_key(tmp_path, monkeypatch, line, key, why):
    k = line.split(":")[0]
    body = "".join(ln + "\n" for ln in RECIPE.splitlines() if not ln.startswith(k + ":")) + line + "\n"
    msg = refused(tmp_path, monkeypatch, "--recipe", str(recipe(tmp_path, body)))
    assert f"recipe.yaml: 键 {key} " in msg and why in msg, msg


def test_string_that_is_not_a_number_is_one_line_naming_the_recipe(tmp_path, monkeypatch):
    p = recipe(tmp_path, RECIPE.replace("beta: 0.1", "beta: abc"))
    msg = refused(tmp_path, monkeypatch, "--recipe", str(p))
    assert msg.startswith(f"--recipe {p}:") and "--beta" in msg and "'abc'" in msg, msg


def test_bad_accelerate_config_values_name_the_key(tmp_path, monkeypatch):
    acc = REPO / "configs" / "lesson5" / "recipes" / "accelerate_single.yaml"
    for text, needle in [("num_processes: .nan\n", "键 num_processes nan"), ("use_cpu: [1]\n", "键 use_cpu"),
                         ("bogus: 1\n", "bogus")]:
        p = tmp_path / "acc.yaml"
        p.write_text(acc.read_text(encoding="utf-8").replace("num_processes: 1\n", "") + text, encoding="utf-8")
        assert needle in refused(tmp_path, monkeypatch, "--accelerate-config", str(p))


def test_bad_recipe_exits_2_in_one_line_without_traceback(tmp_path, run_script):
    p = recipe(tmp_path, RECIPE.replace("beta: 0.1", "beta: .nan"))
    proc = run_script(SCRIPT, "--smoke", "--recipe", str(p), "--output-dir", str(tmp_path / "o"), timeout=300)
    assert_user_error(proc, f"{p}: 键 beta nan")
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("错误: ")]) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "o" / "metrics.json").exists() and not (tmp_path / "o" / "repo").exists()


def test_identical_pairs_are_dropped_with_a_line(tmp_path, monkeypatch, tiny_models, course_log):
    """chosen == rejected（规范化后）的对没有偏好信号：去掉、一行说清几对哪个文件；全是这样的对就拒绝。"""
    pairs = [json.loads(ln) for ln in PAIRS.read_text(encoding="utf-8").splitlines()[:30]]
    for p in pairs[:4]:
        p["rejected"] = p["chosen"] + " 。"     # 只差空白和标点：规范化后相同
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    mod = load_script(SCRIPT)
    seen = {}

    class Stop(Exception):
        pass

    def spy(*a):
        seen["ds"] = real(*a)
        raise Stop

    real = mod.load_pairs
    monkeypatch.setattr(mod, "load_pairs", spy)
    with pytest.raises(Stop):
        mod.main(mod.Args(smoke=True, data=str(own), output_dir=str(tmp_path / "o")))
    split = seen["ds"][0]
    assert len(split["train"]) + len(split["test"]) == 26
    assert any(f"{own}: 去掉 4 对 chosen 与 rejected 相同" in ln for ln in course_log), course_log[-5:]
    for p in pairs:
        p["rejected"] = p["chosen"]
    own.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    monkeypatch.setattr(mod, "load_pairs", real)
    with pytest.raises(UserError, match="30 对的 chosen 与 rejected 相同"):
        mod.main(mod.Args(smoke=True, data=str(own), output_dir=str(tmp_path / "o2")))
    assert not (tmp_path / "o2" / "metrics.json").exists()
