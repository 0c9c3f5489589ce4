# Two commands do all the set-up:  `make test`  and  `make demo`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastcl-installed
# The CPU wheel of torch keeps a CPU machine from pulling a multi-GB CUDA build.
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.6.0
# numpy 2.4 breaks the Triton 3.6 interpreter (int() of 1-element arrays).
NUMPY_PIN  ?= numpy==2.2.6
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py pyproject.toml

.PHONY: test demo bench-cpu clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN) $(NUMPY_PIN) pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo,peers]"
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

demo: $(STAMP)
	$(PY) -m fastcl train

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_losses.py --loss clip --n 16384 --d 256 --reps 5 --methods naive,fastcl_cpu,fastcl_cpu_aten_gemm,floor_4mm --json benchmarks/results/cpu_clip_n16384_d256.json
	$(PY) benchmarks/cpu_losses.py --loss siglip --n 8192 --d 256 --reps 5 --json benchmarks/results/cpu_siglip_n8192_d256.json
	$(PY) benchmarks/cpu_losses.py --loss supcon --n 8192 --d 256 --reps 5 --json benchmarks/results/cpu_supcon_n8192_d256.json

clean:
	rm -rf build *.egg-info fastcl/_C*.so $(VENV)
