# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,weights,pipeline,export
STAMP  := $(VENV)/.installed-$(EXTRAS)
# Two workers: the pipeline tests spend most of their time in one-core imports; a test
# file stays on one worker (its fixtures and order). PYTEST_WORKERS= runs them in one.
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: setup browser demo test faults lint benchmark peers products clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/fod demo

# Debian's Chromium and ChromeDriver for the review page's browser test (it skips without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (Debian packages) for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && \
	    apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "could not install chromium: the browser test will skip"; \
	else echo "note: install chromium and chromium-driver for the browser test (it skips without them)"; fi

test: setup browser
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_WORKERS)

# The fault tests alone (services stopped, killed and full under real runs), and their table
# in BENCHMARKS.md.
faults: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fault_table.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

benchmark: setup
	$(BIN)/python benchmarks/bench_fod.py --data ../shared/data/mvtec_ad --category bottle

# Benchmarks only: FOD's --preset auto beside anomalib's PatchCore and PaDiM on bottle, screw
# and the ELPV solar cells (hours on a 2-core CPU). The peers and the ELPV images live in a
# virtual environment of their own, so the product's stays as users install it.
PEERS_VENV ?= .venv-peers
PRODUCTS ?= --product bottle=../shared/data/mvtec_ad --product screw=../shared/data/screw_512 \
	--product elpv_mono=runs/data/elpv:folder --product elpv_poly=runs/data/elpv:folder

peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[peers]"
	touch $@

products: setup peers
	$(PEERS_VENV)/bin/python benchmarks/elpv_products.py --out runs/data/elpv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_products.py $(PRODUCTS) \
	  --peers-python $(PEERS_VENV)/bin/python --out benchmarks/results/products.json

clean:
	rm -rf $(VENV) runs .pytest_cache
