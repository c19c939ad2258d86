# BreastAI developer/CI entry points (POSIX sh recipes, GNU make >= 4).
#
#   make venv           .venv with the serving dependencies (no torch)
#   make deps-system    apt: orthanc dcmtk dicom3tools rabbitmq-server prometheus (promtool) (if missing)
#   make run            breastai serve: embedded queue, CPU, reference models, state in ./var
#   make test           system deps + test venv + RabbitMQ + ruff + mypy --strict + pytest (unit, integration, e2e, faults)
#   make faults         the fault suite alone, with the full load (FAULT_LOAD_STUDIES=200 studies over 4 associations)
#   make bench          ingest (vs storescp, Orthanc) and analysis (vs its bare ONNX graphs) as ratios: bench/results/ (BENCH_ARGS=--long)
#   make train          CPU torch + the train extra, then the segmenter, its refiner and every paper family (two stages at a time)
#   make train-FAMILY   one family: dlr_lh dlr_bm cldlr dl_u dl_u_lh dl_m mupnet (network, finish, export; DLR_BM, CLDLR and MUP-Net after their mask pretraining)
#   make train-lexicon  refit the lexicon-descriptor model (after the segmenter or refiner changed)
#   make train-consensus  refit the consensus of the exported families, and the LH one where the folder has it (after any family changed)
#   make train-lh-consensus  opt-in: DL-U's network on LH (dl_u_lh) and its mean with DLR_LH, read by the 4A co-decision
#   make evaluate       breastai evaluate on the held-out split; regenerates models/cards
#   make external       external validation: the consensus members trained without HOLDOUT (busbra), scored on all of it
#   make samples        regenerate samples/ (scripts/make_samples.py)
#   make send-samples   C-STORE samples/ to a running service with dcmtk's storescu
#
# Every install step is guarded by a stamp file in .venv/, so a second run is a no-op.

SHELL := /bin/sh
.DEFAULT_GOAL := help

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip --disable-pip-version-check
# Never let a bare `torch` requirement pull the CUDA build (several GB): the
# train install is constrained to this CPU wheel (/opt/wheels on our machines).
TORCH_VERSION ?= 2.13.0

VAR_DIR       ?= var
# The development datasets (read-only; never committed).
DATASETS      ?= ../shared/datasets
# Paper model families with real training data (docs/models.md), and where `make evaluate` writes.
FAMILIES      := dlr_lh dlr_bm cldlr dl_u dl_u_lh dl_m mupnet
EVALUATION    ?= var/evaluation
# Flags of `breastai serve` (see `breastai serve --help`); override on the command line.
# CPU is implicit (ONNX Runtime) and the reference models are the bundled default
# (models/weights; add --model-dir DIR for others). Listener: BREASTAI@0.0.0.0:11112,
# metrics on :9464 (deploy/prometheus.yml).
SERVE_ARGS    ?= --queue embedded --spool-dir $(VAR_DIR)/spool \
                 --destination $(VAR_DIR)/results --log-format console
PYTEST_ARGS   ?= -q

# Where `make send-samples` sends to (the service's Storage SCP).
SCP_HOST      ?= localhost
SCP_PORT      ?= 11112
SCP_AET       ?= BREASTAI

# System tools are looked up only in the system directories: .venv/bin holds
# pynetdicom's Python apps named storescu/echoscu/... with different flags.
SYSTEM_PATH   := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# prometheus: its promtool checks deploy/alerts.yml and the scrape configs (tests/unit/test_deploy.py); 19 MB download.
SYSTEM_TOOLS  := Orthanc storescu dciodvfy rabbitmq-server promtool
SYSTEM_PKGS   := orthanc dcmtk dicom3tools rabbitmq-server prometheus
STORESCU      ?= $(shell (PATH='$(SYSTEM_PATH)'; command -v storescu) 2>/dev/null || echo storescu)

# Fail loudly if an install dragged in CUDA wheels (nvidia-*), e.g. an unpinned torch.
define check_no_cuda
	@if $(PIP) list --format=freeze 2>/dev/null | grep -qi '^nvidia-'; then \
	  echo "ERROR: CUDA packages (nvidia-*) were installed into $(VENV); torch must be $(TORCH_VERSION) CPU" >&2; \
	  $(PIP) list --format=freeze | grep -i -e '^nvidia-' -e '^torch=' >&2; exit 1; \
	fi
endef

.PHONY: help venv evaluate-venv test-venv train-venv deps-system rabbitmq run test faults bench lint typecheck train train-reference train-segmentation-lane train-stages $(addprefix train-,$(FAMILIES)) train-lexicon train-consensus train-lh-consensus evaluate external samples send-samples clean distclean

help:
	@sed -n '1,17s/^# \{0,1\}//p' Makefile

# ------------------------------------------------------------------ venv + stamps

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "ERROR: $(PYTHON) is $$($(PYTHON) -V 2>&1); BreastAI needs Python >= 3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Serving dependencies only: no torch.
$(VENV)/.stamp-serve: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(check_no_cuda)
	touch $@

# The tests exercise every network, loss and ONNX export, so they need the
# train extra (CPU torch) too.
$(VENV)/.stamp-test: $(VENV)/.stamp-train pyproject.toml
	$(PIP) install -c $(VENV)/constraints-train.txt -e '.[train,test]'
	$(check_no_cuda)
	touch $@

$(VENV)/.stamp-train: $(VENV)/.stamp-serve pyproject.toml
	printf 'torch==%s\n' '$(TORCH_VERSION)' > $(VENV)/constraints-train.txt
	$(PIP) install -c $(VENV)/constraints-train.txt 'torch==$(TORCH_VERSION)'
	$(PIP) install -c $(VENV)/constraints-train.txt -e '.[train]'
	$(check_no_cuda)
	touch $@

# breastai evaluate needs scipy and matplotlib, not torch.
$(VENV)/.stamp-evaluate: $(VENV)/.stamp-serve pyproject.toml
	$(PIP) install -e '.[evaluate]'
	$(check_no_cuda)
	touch $@

venv: $(VENV)/.stamp-serve
evaluate-venv: $(VENV)/.stamp-evaluate
test-venv: $(VENV)/.stamp-test
train-venv: $(VENV)/.stamp-train

# ------------------------------------------------------------------ system packages

# No-op when every tool is present. Otherwise installs (as root, or with
# passwordless sudo) without letting Debian start the services: the tests run
# their own Orthanc on free ports, and 4242/8042 must stay free.
deps-system:
	@missing=; \
	for t in $(SYSTEM_TOOLS); do \
	  (PATH='$(SYSTEM_PATH)'; command -v "$$t") >/dev/null 2>&1 || missing="$$missing $$t"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps-system: $(SYSTEM_TOOLS) present"; exit 0; fi; \
	echo "deps-system: missing:$$missing"; \
	SUDO=; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO='sudo -n'; \
	  else echo "deps-system: not root and no passwordless sudo; skipping (install: $(SYSTEM_PKGS))" >&2; exit 0; fi; \
	fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "deps-system: no apt-get here; install $(SYSTEM_PKGS) by hand" >&2; exit 0; fi; \
	policy=/usr/sbin/policy-rc.d; made_policy=; \
	if [ ! -e $$policy ]; then \
	  printf '#!/bin/sh\n# make deps-system: do not start services during install\nexit 101\n' | $$SUDO tee $$policy >/dev/null && \
	  $$SUDO chmod 755 $$policy && made_policy=1; \
	fi; \
	status=0; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PKGS) || status=$$?; \
	if [ -n "$$made_policy" ]; then $$SUDO rm -f $$policy; fi; \
	if [ $$status -ne 0 ]; then echo "deps-system: apt-get failed ($$status)" >&2; exit $$status; fi; \
	for unit in orthanc prometheus; do \
	  $$SUDO service $$unit stop >/dev/null 2>&1 || true; \
	  if [ -d /run/systemd/system ]; then $$SUDO systemctl disable --now $$unit >/dev/null 2>&1 || true; \
	  else $$SUDO update-rc.d $$unit disable >/dev/null 2>&1 || true; fi; \
	done; \
	echo "deps-system: installed $(SYSTEM_PKGS) (system orthanc and prometheus services stopped/disabled)"

rabbitmq: deps-system
	sh scripts/ensure_rabbitmq.sh

# ------------------------------------------------------------------ run / test / train

run: venv
	mkdir -p $(VAR_DIR)/spool $(VAR_DIR)/results
	$(VENV)/bin/breastai serve $(SERVE_ARGS)

test: deps-system test-venv rabbitmq lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

# CI runs tests/faults inside `make test` with 40 studies in the load scenario; this is the full-size run.
FAULT_LOAD_STUDIES ?= 200
faults: deps-system test-venv rabbitmq
	BREASTAI_FAULT_LOAD_STUDIES=$(FAULT_LOAD_STUDIES) $(VENV)/bin/pytest $(PYTEST_ARGS) -s tests/faults

# bench/README.md: each figure beside its reference, measured in the same run, printed and written to
# bench/results/<date>-<host>.json. A few minutes on 2 cores; BENCH_ARGS=--long for the longer run (--help for the rest).
BENCH_ARGS    ?=
bench: deps-system test-venv rabbitmq
	$(PY) -m bench $(BENCH_ARGS)

# ruff (configured in pyproject.toml): the rules, then the layout. A file that `ruff format` would change fails too:
# the formatter settles wrapping and quotes once, so no diff argues about them (fix: ruff check --fix; ruff format).
lint: test-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy --strict over the packages (configured in pyproject.toml).
typecheck: test-venv
	$(VENV)/bin/mypy

# Resumable: each part checkpoints every epoch under runs/reference/<part>/ or runs/families/<family>/.

#
# make train runs TRAIN_JOBS stages side by side, each on its share of the cores (TRAIN_THREADS): the segmenter lane
# (segmenter -> refiner -> export -> lexicon) beside the families and their pretraining. On 2 cores, two one-thread
# stages got through 1.16-1.5x the work of one two-thread stage (measured: docs/models.md, "bf16 and threads"). Exports
# merge into the manifest under a lock. TRAIN_JOBS=1 runs one stage at a time on all cores, as before. Output is not
# held back per stage (no --output-sync): every progress line names its stage ("part"), and a two-hour run shows progress.
TRAIN_JOBS    ?= 2
NPROC         := $(shell nproc 2>/dev/null || echo 2)
TRAIN_THREADS ?= $(shell n=$$(( $(NPROC) / $(TRAIN_JOBS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

train: train-venv
	$(MAKE) -j$(TRAIN_JOBS) --no-print-directory THREAD_FLAGS='--threads $(TRAIN_THREADS)' train-stages
	$(MAKE) train-consensus
	$(MAKE) evaluate

# The segmenter and its refiner, exported into models/weights.
define train_reference_commands
	$(PY) -m models.training.train_reference segmenter --datasets $(DATASETS) $(THREAD_FLAGS)
	$(PY) -m models.training.train_reference refiner --datasets $(DATASETS) $(TRAIN_FLAGS) $(THREAD_FLAGS)
	$(PY) -m models.training.export_reference --datasets $(DATASETS)
endef
train_lexicon_command = $(VENV)/bin/breastai train lexicon --datasets $(DATASETS)
train-reference: train-venv
	$(train_reference_commands)

# One job per lane stage, with no prerequisite between them: make -j passes over a target whose prerequisite is still
# running and gives free slots to later ones, so a waiting target starts last (seen on 2026-12-05). The segmenter lane
# is one job (the lexicon reads the new outlines); each family is one job with its mask pretraining; longest first.
TRAIN_ORDER   := dlr_bm dlr_lh mupnet cldlr dl_u dl_m
train-stages: train-segmentation-lane $(addprefix train-,$(TRAIN_ORDER))
train-segmentation-lane: train-venv
	$(train_reference_commands)
	$(train_lexicon_command)

# bf16 autocast: about 1.6x faster where the CPU has AVX512-BF16 or AMX (the reference runs used it), but about
# ten times slower where it has neither (measured on an AMD EPYC without AVX-512), so it is on only where the CPU has them.
TRAIN_FLAGS   ?= $(if $(shell grep -qsE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo yes),--bf16,)

# DLR_BM, CLDLR and MUP-Net start from mask pretraining of their own network (lesion outlines of the training split, no
# labels); the pretraining resumes from its last.pt, so a finished one costs nothing when make runs it again.
# Its epochs and batch size are the recipe's (REFERENCE_MASK_PRETRAINING in models/training/mask_pretraining.py).
# A family and its pretraining are one job: as a separate prerequisite, a pretraining that ended let make -j hand the
# free slot to a later, shorter family, so DLR_BM (the longest) started last (seen in the 2026-12-05 run).
MASK_PRETRAINED := $(addprefix pretrain-masks-,dlr_bm cldlr mupnet)
.PHONY: $(MASK_PRETRAINED)
INIT_dlr_bm   := --init runs/pretrain-masks/dlr_bm/best.pt
INIT_cldlr    := --init runs/pretrain-masks/cldlr/best.pt
INIT_mupnet   := --init runs/pretrain-masks/mupnet/best.pt
pretrain_masks = $(VENV)/bin/breastai train pretrain $(1) --datasets $(DATASETS) $(TRAIN_FLAGS) $(THREAD_FLAGS)

$(addprefix train-,$(FAMILIES)): train-%: train-venv
	$(if $(filter pretrain-masks-$*,$(MASK_PRETRAINED)),$(call pretrain_masks,$*))
	$(VENV)/bin/breastai train $* --datasets $(DATASETS) $(TRAIN_FLAGS) $(THREAD_FLAGS) $(INIT_$*)

$(MASK_PRETRAINED): pretrain-masks-%: train-venv
	$(call pretrain_masks,$*)

# The mammography lesion finder on mini-MIAS (models/families/mg_finder; not part of make train): network, then its
# export into models/weights (role mg_finder). make evaluate then measures it on the held-out split and writes its card.
.PHONY: train-mg_finder
train-mg_finder: train-venv
	$(PY) -m models.training.train_mg_finder --datasets $(DATASETS) $(TRAIN_FLAGS) $(THREAD_FLAGS)

# The ABVS three-plane model (models/families/abvs; not part of make train) on volumes BUILT from the 2-D lesions (no
# public ABVS data exists): volumes, network, export into models/weights (role abvs_three_plane), then, once, the test
# split's volumes beside the 2-D consensus, which writes models/cards/abvs_three_plane.md.
.PHONY: train-abvs_three_plane
train-abvs_three_plane: train-venv
	$(PY) -m models.training.train_abvs_three_plane --datasets $(DATASETS) $(TRAIN_FLAGS) $(THREAD_FLAGS)

# External validation: train the consensus members without one dataset (DLR_BM, CLDLR and MUP-Net after their mask
# pretraining, also without it), fit their consensus on the rest, score all of the held-out dataset; writes models/cards/external/without_$(HOLDOUT).md (weights stay in runs/, not shipped).
HOLDOUT       ?= busbra
external: train-venv
	$(VENV)/bin/breastai train external --holdout $(HOLDOUT) --datasets $(DATASETS) $(TRAIN_FLAGS)

# Lexicon descriptors read on the folder's own outlines: refit after the segmenter or refiner changed (scikit-learn, no torch).
train-lexicon: train-venv
	$(train_lexicon_command)

# Equal-weight mean log-odds of the exported families; only its operating point is fitted (validation split). Refits
# the headline and any other consensus the folder has (the opt-in LH one below), so retrained members leave none stale.
train-consensus: venv
	$(VENV)/bin/breastai train consensus --datasets $(DATASETS)

# Opt-in, not part of make train (it missed the adoption bar: docs/models.md, "The LH consensus"): DL-U's network trained on DLR_LH's
# BI-RADS 2/3 vs 4/5 labels (two seeds), averaged with DLR_LH as consensus_lh, which the 4A co-decision then reads.
train-lh-consensus: train-dl_u_lh
	$(VENV)/bin/breastai train consensus --task birads_high --datasets $(DATASETS)

# The cards quote the evaluation, and tests/unit/test_cards.py checks them against the copy kept beside them.
evaluate: evaluate-venv
	$(VENV)/bin/breastai evaluate $(DATASETS) --output $(EVALUATION) --cards models/cards
	mkdir -p models/cards/evaluation
	cp $(EVALUATION)/report.json $(EVALUATION)/report.md $(EVALUATION)/*.png models/cards/evaluation/
	cp $(EVALUATION)/report.md docs/evaluation.md

samples: venv
	$(PY) scripts/make_samples.py

# +sd: scan directories for input files, +r: recurse into them, +sp: only *.dcm (not the README).
send-samples:
	@[ -x "$(STORESCU)" ] || { echo "ERROR: dcmtk storescu not found (make deps-system)" >&2; exit 1; }
	$(STORESCU) -aec $(SCP_AET) -aet SAMPLES +sd +r +sp '*.dcm' $(SCP_HOST) $(SCP_PORT) samples/

clean:
	rm -rf $(VAR_DIR) .pytest_cache

distclean: clean
	rm -rf $(VENV) *.egg-info
