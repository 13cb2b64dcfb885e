"""课程共享代码：模型三档加载、数据格式与校验、命令行、运行目录与指标。"""
import os

# 课程默认完全离线：只有用户显式用 --source hf/modelscope 时才联网（那条路径会自己改回在线）。
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb 不要往外发遥测
os.environ.setdefault("DO_NOT_TRACK", "1")
