TORCH_VERSION ?= 2.13.0
PY ?= python3
VENV = .venv
STAMP = $(VENV)/.installed

.PHONY: install test lint format demo bench fuzz clean distclean

install: $(STAMP)

# torch first, pinned: `pip install torch==2.13.0` takes the CPU wheel this machine provides; a bare `torch`
# requirement resolved on its own would pull the newest CUDA build (several GB).
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -q -e '.[dev,ray,serve]'
	$(VENV)/bin/pip install -q -e '.[interop]' torch==$(TORCH_VERSION) || echo "optional compressed-tensors not installed (it would need another torch): its tests are skipped"
	$(VENV)/bin/python -c "from lowmem_paligemma.formats import native; native.build()"
	touch $(STAMP)

test: install
	$(VENV)/bin/pytest -q

# ruff, then the layering (imports only go down) and every name docs/architecture.md gives, checked against the code.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q tests/test_layers.py tests/test_docs.py

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Thousands of seeded mutations of checkpoints and images (a few minutes); writes docs/results/fuzz.md.
fuzz: install
	$(VENV)/bin/python tests/fuzzing.py --cases 4000 --images 4000

demo: install
	$(VENV)/bin/python -m bench.demo

# One benchmark at a time: two at once on a small machine measure nothing. Each writes docs/results/<name>.md.
bench: install
	$(VENV)/bin/python -m bench.kernels
	$(VENV)/bin/python -m bench.load_memory
	$(VENV)/bin/python -m bench.load_speed
	$(VENV)/bin/python -m bench.generate_speed

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
