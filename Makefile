# make report : set up .venv if missing, build the data, run notebooks 01-05 with papermill, export HTML to reports/
# make test   : same set-up, then every test (unit tests + nbval over the notebooks, smoke profile)
# PROFILE=smoke|cpu|gpu|paper picks the report's profile; default: gpu with CUDA, else cpu.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
PROFILE ?=

.PHONY: report test data venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

data: venv
	$(PY) dsvae_lib.py data

report: venv data
	@mkdir -p reports
	@profile="$(PROFILE)"; [ -n "$$profile" ] || profile=$$($(PY) -c "import dsvae_lib; print(dsvae_lib.default_profile())"); \
	echo "report profile: $$profile"; \
	for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); \
	  DSVAE_PROFILE=$$profile PYTHONPATH=$(CURDIR) $(VENV)/bin/papermill --cwd notebooks $$nb reports/$$name -p profile $$profile || exit 1; \
	  cp reports/$$name $$nb; \
	  $(VENV)/bin/jupyter nbconvert --log-level WARN --to html reports/$$name --output-dir reports || exit 1; \
	done; \
	echo "report written to reports/*.html (profile $$profile)"

test: venv data
	rm -rf runs/smoke-*  # the notebooks' smoke runs are retrained from scratch on every test run
	DSVAE_PROFILE=smoke PYTHONPATH=$(CURDIR) $(PY) -m pytest -q tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

clean:
	rm -rf reports runs/smoke-*
