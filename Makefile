# make report : set up .venv if missing, run notebooks 01-06 with papermill into reports/ (HTML, reports/index.html);
#               copies the cleaned notebooks and the figures back only when all succeeded and the profile is one of
#               record (not smoke), or with RECORD=1. A failed run leaves the repository as it was. Evaluations
#               stored in figures/ are reused when their key matches (and spot-checked); FRESH=1 recomputes them.
# make reproduce : train both q variants from scratch under runs/ (resuming if cut short), then the same report on
#                  them instead of the committed weights; copied back only with RECORD=1 (weights/ is never touched)
# make test   : same set-up, then every test (unit tests, papermill and browser tests, nbval over the notebooks
#               under the smoke profile)
# PROFILE=smoke|cpu|gpu|paper picks the report's profile; default: $DSVAE_PROFILE, else gpu with CUDA, else cpu.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?=
RECORD ?=
FRESH ?=

.PHONY: report reproduce test data venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . > $(VENV)/editable-install.log 2>&1 \
	  || { cat $(VENV)/editable-install.log; exit 1; }
	touch $@

data: venv
	$(VENV)/bin/dsvae data

report: venv
	$(VENV)/bin/dsvae report $(if $(PROFILE),--profile $(PROFILE)) $(if $(filter 1 yes true,$(RECORD)),--record) \
	  $(if $(filter 1 yes true,$(FRESH)),--fresh)

reproduce: venv data  # train both q variants from scratch (or resume them) under runs/, then report on them
	$(VENV)/bin/dsvae train $(if $(PROFILE),--profile $(PROFILE)) --set q_z=factorised
	$(VENV)/bin/dsvae train $(if $(PROFILE),--profile $(PROFILE)) --set q_z=full
	$(VENV)/bin/dsvae report $(if $(PROFILE),--profile $(PROFILE)) --no-weights $(if $(filter 1 yes true,$(RECORD)),--record)

test: venv data
	rm -rf runs/smoke-*  # the notebooks' smoke runs are retrained from scratch on every test run
	DSVAE_PROFILE=smoke $(PY) -m pytest -q tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

clean:
	rm -rf reports runs/smoke-*
