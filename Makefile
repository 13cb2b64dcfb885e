# 一条命令装好并跑完课程（make course），一条命令跑测试（make test）。需要 Python 3.11（3.10+ 亦可）。
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup models course course-full bench test test-fast lint clean

setup: $(STAMP)

# torch 先单独装：CPU 机器上 torch==2.13.0 取 CPU 轮子；GPU 用户请先装好对应 CUDA 版本的 torch 2.13.0
$(STAMP): requirements.txt requirements-nodeps.txt requirements-nobuildiso.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --no-build-isolation -r requirements-nobuildiso.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# 构建极小模型 + 把 smollm2-135m 的 GGUF 转成 safetensors 缓存（离线，约 1 分钟，只做一次）
models: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m common.models

course: models
	HF_HUB_OFFLINE=1 $(BIN)/python course.py --smoke

# 参考运行：默认模式，一次一个脚本，记到 results/cpu-2core/（在空闲机器上跑；已记录且没改的脚本跳过）
course-full: models
	HF_HUB_OFFLINE=1 $(BIN)/python course.py --full

# 效率基准：训练 / 评估 / 生成 / 服务（对照 llama.cpp 的 llama-server）/ 检索，写 results/bench-cpu-2core.json
# 空闲的机器上跑（实测用时写在结果里）；只有这一条会联网（下载 llama-cpp-python 的源码包编 llama-server）
bench: models
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py

# 冒烟脚本都单线程跑极小模型：两核上两个 pytest 进程并行，整套测试时间接近减半（同一文件的测试留在同一进程；
# 文件的排队顺序见 tests/conftest.py 的 RUN_ORDER）
# 浸泡测试（64 个并发客户端、/health p99 < 200 ms）量的是延迟：等并行部分跑完，在空闲的机器上单独跑
test: models lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not soak"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m soak

test-fast: models
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow and not needs_service"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache
