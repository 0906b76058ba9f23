# Entry points for a fresh clone: `make demo`, `make test`. Each target runs scripts/setup.sh
# first (about a second when nothing changed) and then runs inside .venv (scripts/env.sh).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
ENV := . scripts/env.sh

.PHONY: setup demo test bench lint

setup:
	bash scripts/setup.sh

# Starts the node with config/panda.yaml, calls its services and writes PNGs under out/.
demo: setup
	$(ENV) && mace-demo

# A ROS domain per run (10..99, from the shell's pid), so that concurrent runs on one machine do
# not see each other's nodes; MACE_TEST_DOMAIN_ID=<id> picks one by hand.
test: setup
	$(ENV) && export ROS_DOMAIN_ID="$${MACE_TEST_DOMAIN_ID:-$$(( $$$$ % 90 + 10 ))}" \
	  && echo "[test] ROS_DOMAIN_ID=$$ROS_DOMAIN_ID" \
	  && python -m pytest -q test

bench: setup
	mkdir -p out
	$(ENV) && mace-bench ik --scene config/scenes/box.yaml --targets 20 --seed 0 \
	  --json out/bench_box.json

lint: setup
	$(ENV) && flake8 --max-line-length 99 mace_core mace_ros test
