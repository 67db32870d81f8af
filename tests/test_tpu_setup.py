"""tpu_setup.sh: the exact gcloud commands of every sub-command (--dry-run), usage errors, and the remote
shell lines themselves, run here against a simulated one-worker TPU VM (a fake `gcloud` that executes
`ssh --command` with bash and `scp` with a copy, in a temporary home). No gcloud, network or TPU needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tpu_setup.sh"
COMMANDS = ["create", "copy", "install", "run", "logs", "stop", "ssh", "delete"]
# Variables the script reads; cleared so that the developer's own environment cannot change the results.
SCRIPT_VARIABLES = ["TPU_NAME", "TPU_ZONE", "TPU_TYPE", "TPU_VERSION", "TPU_PROJECT", "QUEUED", "SPOT",
                    "TPU_TIMEOUT", "TPU_POLL", "REPO_URL", "REPO_REF", "TPU_REMOTE_DIR", "TPU_VENV", "TPU_PYTHON",
                    "TPU_WORKER", "FOREGROUND", "FOLLOW", "TPU_LOG_LINES", "DRY_RUN"]
FLAGS = ["--name", "--zone", "--type", "--accelerator-type", "--version", "--runtime-version", "--project",
         "--queued", "--spot", "--timeout", "--pull", "--ref", "--remote-dir", "--venv", "--python", "--worker",
         "--foreground", "--follow", "--lines", "--dry-run", "--help"]
TRIPWIRES = ["gcloud", "tar", "git", "ssh", "scp", "setsid", "nohup", "sleep"]
NAME, ZONE = "dalle-test", "us-central2-b"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, "--zone", ZONE]
STAMP = re.compile(r"\d{8}-\d{6}")


@pytest.fixture
def tripwire(tmp_path: Path) -> Path:
    """A PATH directory whose gcloud (and tar, git, ...) only leave a marker: dry runs must call none of them."""
    bin_dir = tmp_path / "tripwire"
    bin_dir.mkdir()
    for name in TRIPWIRES:
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "$0 $*" >> "{tmp_path}/executed"\nexit 1\n')
        tool.chmod(0o755)
    yield bin_dir
    executed = tmp_path / "executed"
    assert not executed.exists(), f"a dry run executed: {executed.read_text()}"


def script_env(bin_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HOME=str(home))
    env.update(extra)
    return env


def tpu_setup(bin_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    home = bin_dir.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], env=script_env(bin_dir, home, **extra),
                          capture_output=True, text=True, timeout=60)


def printed(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The commands a dry run printed, parsed back the way a shell reads a pasted line."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_line(command: list[str]) -> str:
    assert command[:len(SSH)] == SSH and command[-2] == "--command", command
    return command[-1]


# --------------------------------------------------------------------------------------------------------
# Dry runs: exact commands


def test_create_prints_tpu_vm_create_with_family_default_version(tripwire):
    result = tpu_setup(tripwire, "--dry-run", "create", "--name", NAME, "--zone", ZONE, "--type", "v4-32")
    assert printed(result) == [["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, "--zone", ZONE,
                                "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]]
    assert "tpu-ubuntu2204-base" in result.stderr  # the chosen default is said, not silent


@pytest.mark.parametrize("accelerator, version", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-256", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
                                                  ("v3-8", "tpu-ubuntu2204-base")])
def test_default_runtime_version_per_family(tripwire, accelerator, version):
    [command] = printed(tpu_setup(tripwire, "--dry-run", "create", "--name", NAME, "--zone", ZONE,
                                  "--type", accelerator))
    assert command[command.index("--version") + 1] == version


def test_create_spot_project_and_explicit_version(tripwire):
    result = tpu_setup(tripwire, "create", "--dry-run", "--name", NAME, "--zone", ZONE, "--accelerator-type",
                       "v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot", "--project", "my-project")
    assert printed(result) == [["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, "--zone", ZONE,
                                "--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite", "--spot",
                                "--project", "my-project"]]


def test_create_queued_prints_create_and_one_describe_then_returns(tripwire):
    start = time.monotonic()
    result = tpu_setup(tripwire, "--dry-run", "create", "--queued", "--spot", "--name", NAME, "--zone", ZONE,
                       "--type", "v4-256", "--version", "tpu-ubuntu2204-base", "--timeout", "86400")
    assert time.monotonic() - start < 20  # the wait loop does not wait in a dry run
    assert printed(result) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", f"{NAME}-qr", "--node-id", NAME, "--zone", ZONE,
         "--accelerator-type", "v4-256", "--runtime-version", "tpu-ubuntu2204-base", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{NAME}-qr", "--zone", ZONE,
         "--format=value(state.state)"],
    ]
    assert "ACTIVE" in result.stderr and "86400" in result.stderr


def test_environment_variables_equal_flags(tripwire):
    by_flags = tpu_setup(tripwire, "--dry-run", "create", "--queued", "--spot", "--name", NAME, "--zone", ZONE,
                         "--type", "v5p-32", "--version", "v2-alpha-tpuv5", "--project", "p")
    by_env = tpu_setup(tripwire, "create", DRY_RUN="1", QUEUED="1", SPOT="1", TPU_NAME=NAME, TPU_ZONE=ZONE,
                       TPU_TYPE="v5p-32", TPU_VERSION="v2-alpha-tpuv5", TPU_PROJECT="p")
    assert printed(by_env) == printed(by_flags)
    # A flag wins over its variable.
    [command] = printed(tpu_setup(tripwire, "--dry-run", "delete", "--name", "other", TPU_NAME=NAME, TPU_ZONE=ZONE))
    assert command[5] == "other"


def test_install_runs_on_all_workers_in_a_venv_with_pins_and_checks_devices(tripwire):
    [command] = printed(tpu_setup(tripwire, "--dry-run", "install", "--name", NAME, "--zone", ZONE))
    assert command[:-2] == SSH + ["--worker=all"]
    line = remote_line(command)
    assert "cd ~/dalle_jax" in line
    assert "uv venv --seed --python 3.11 ~/dalle_jax_venv" in line
    assert "~/dalle_jax_venv/bin/python -m pip install --quiet -r requirements.txt -e '.[tpu]'" in line
    assert "JAX_PLATFORMS=tpu ~/dalle_jax_venv/bin/python -c" in line and "jax.device_count()" in line
    [command] = printed(tpu_setup(tripwire, "--dry-run", "install", "--name", NAME, "--zone", ZONE,
                                  "--python", "python3.12", "--venv", "envs/dj"))
    assert "python3.12 -m venv ~/envs/dj" in remote_line(command) and "uv" not in remote_line(command)


def test_copy_uploads_a_tarball_without_git_and_runs_to_every_worker(tripwire):
    tar, scp, ssh = printed(tpu_setup(tripwire, "--dry-run", "copy", "--name", NAME, "--zone", ZONE))
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(ROOT), "."]
    assert {"--exclude=./.git", "--exclude=./runs", "--exclude=__pycache__"} <= set(tar)
    tarball = tar[tar.index("-czf") + 1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{NAME}:dalle_jax_upload.tar.gz",
                   "--zone", ZONE, "--worker=all"]
    assert ssh[:-2] == SSH + ["--worker=all"]
    assert "tar -xzf ~/dalle_jax_upload.tar.gz -C ~/dalle_jax" in remote_line(ssh)
    assert "! -name runs" in remote_line(ssh)


def test_copy_pull_clones_on_every_worker(tripwire):
    url = "https://github.com/someone/dalle_jax"
    [command] = printed(tpu_setup(tripwire, "--dry-run", "copy", "--name", NAME, "--zone", ZONE, "--pull", url,
                                  "--ref", "v0.1"))
    assert command[:-2] == SSH + ["--worker=all"]
    assert f"git clone --quiet {url} ~/dalle_jax" in remote_line(command)
    assert "checkout --quiet --detach v0.1" in remote_line(command)
    [command] = printed(tpu_setup(tripwire, "--dry-run", "copy", TPU_NAME=NAME, TPU_ZONE=ZONE, REPO_URL=url))
    assert "--detach origin/HEAD" in remote_line(command)


def test_run_starts_the_users_command_on_all_workers_in_the_venv_under_nohup(tripwire):
    user = ["dalle-jax", "train-prior", "--preset", "1b", "--set", "mesh.ici_parallelism=1,16,1",
            "--out", "runs/my run", "--note", "it's \"quoted\" $HOME"]
    [command] = printed(tpu_setup(tripwire, "--dry-run", "run", "--name", NAME, "--zone", ZONE, "--", *user))
    assert command[:-2] == SSH + ["--worker=all"]
    line = remote_line(command)
    assert ". ~/dalle_jax_venv/bin/activate" in line and "cd ~/dalle_jax;" in line
    assert "export JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1" in line
    assert "export DALLE_JAX_DISTRIBUTED=1;" in line  # every worker joins the slice's jax.distributed job
    # The user's words survive two levels of quoting: the remote `bash -c CODE` gets exactly them back.
    code = re.search(r"setsid nohup bash -c (.*) > ~/dalle_jax_logs/(\d{8}-\d{6})\.log 2>&1 < /dev/null &", line)
    assert code, line
    assert shlex.split(shlex.split(code.group(1))[0]) == user
    assert f"~/dalle_jax_logs/{code.group(2)}.pid" in line


def test_run_foreground_streams_and_a_single_word_is_shell_code(tripwire):
    [command] = printed(tpu_setup(tripwire, "--dry-run", "run", "--foreground", "--name", NAME, "--zone", ZONE,
                                  "--", "dalle-jax info --preset 1b && nproc"))
    line = remote_line(command)
    assert "nohup" not in line and "set -o pipefail; bash -c 'dalle-jax info --preset 1b && nproc'" in line
    [command] = printed(tpu_setup(tripwire, "--dry-run", "run", "--no-distributed", "--name", NAME, "--zone", ZONE,
                                  "--", "nproc"))
    assert "DALLE_JAX_DISTRIBUTED" not in remote_line(command)
    assert re.search(r"\| tee ~/dalle_jax_logs/\d{8}-\d{6}\.log$", line)


def test_logs_stop_ssh_delete(tripwire):
    base = ["--dry-run", "--name", NAME, "--zone", ZONE]
    [logs] = printed(tpu_setup(tripwire, "logs", *base))
    assert logs[:-2] == SSH + ["--worker=all"] and "tail -n 50 " in remote_line(logs)
    [logs] = printed(tpu_setup(tripwire, "logs", *base, "--worker", "3", "--follow", "--lines", "200"))
    assert logs[:-2] == SSH + ["--worker=3"] and "tail -n 200 -F" in remote_line(logs)
    [stop] = printed(tpu_setup(tripwire, "stop", *base))
    assert stop[:-2] == SSH + ["--worker=all"] and "kill -TERM" in remote_line(stop)
    assert printed(tpu_setup(tripwire, "ssh", *base)) == [SSH + ["--worker=0"]]
    assert printed(tpu_setup(tripwire, "ssh", *base, "--worker=5", "--", "ls", "-l")) == [
        SSH + ["--worker=5", "--command", "ls -l"]]
    assert printed(tpu_setup(tripwire, "delete", *base)) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, "--zone", ZONE, "--quiet"]]
    assert printed(tpu_setup(tripwire, "delete", *base, "--queued", "--project", "p")) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, "--zone", ZONE, "--quiet", "--project", "p"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete", f"{NAME}-qr", "--zone", ZONE, "--quiet",
         "--project", "p"]]


# --------------------------------------------------------------------------------------------------------
# Help and usage errors


@pytest.mark.parametrize("args", [["--help"], [], ["run", "-h"]])
def test_help_teaches_every_command_flag_variable_and_slice(tripwire, args):
    result = tpu_setup(tripwire, *args)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for word in COMMANDS + FLAGS + SCRIPT_VARIABLES:
        assert re.search(rf"(^|[\s(]){re.escape(word)}([\s=),]|$)", text, re.M), f"--help does not mention {word}"
    for example in ["v5litepod-8", "v4-32", "v5p-32", "v4-256", "v5p-256", "--preset demo", "--preset 1b",
                    "--preset paper_12b", "--set mesh.ici_parallelism=", "jax.distributed.initialize()"]:
        assert example in text


@pytest.mark.parametrize("args, named", [
    (["create", "--zone", ZONE, "--type", "v4-8"], ["--name (or TPU_NAME)"]),
    (["create"], ["--name (or TPU_NAME)", "--zone (or TPU_ZONE)", "--type (or TPU_TYPE)"]),
    (["create", "--name", NAME, "--zone", ZONE], ["--type (or TPU_TYPE)"]),
    (["logs", "--name", NAME], ["--zone (or TPU_ZONE)"]),
    (["run", "--name", NAME, "--zone", ZONE], ["run needs the command", "after --"]),
    (["launch", "--name", NAME], ["unknown command 'launch'"]),
    (["create", "--name", NAME, "--zone", ZONE, "--tpye", "v4-8"], ["unknown flag --tpye"]),
    (["create", "--name", NAME, "--zone", ZONE, "--type"], ["--type needs a value"]),
    (["create", "--name", NAME, "--zone", ZONE, "--type", "v4"], ["--type 'v4' (TPU_TYPE)"]),
    (["create", "--name", NAME, "--zone", ZONE, "--type", "v9z-8"], ["--version (or TPU_VERSION)"]),
    (["create", "--name", "Bad_Name", "--zone", ZONE, "--type", "v4-8"], ["--name 'Bad_Name' (TPU_NAME)"]),
    (["copy", "--name", NAME, "--zone", ZONE, "--remote-dir", "../x"], ["--remote-dir '../x' (TPU_REMOTE_DIR)"]),
    (["logs", "--name", NAME, "--zone", ZONE, "--worker", "two"], ["--worker 'two'"]),
    (["run", "--name", NAME, "--zone", ZONE, "dalle-jax"], ["unexpected argument 'dalle-jax'"]),
    (["delete", "--name", NAME, "--zone", ZONE, "--", "x"], ["delete takes no command"]),
])
def test_usage_errors_exit_2_and_name_the_flag(tripwire, args, named):
    result = tpu_setup(tripwire, "--dry-run", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    for text in named:
        assert text in result.stderr


def test_unknown_family_warns_but_proceeds(tripwire):
    result = tpu_setup(tripwire, "--dry-run", "create", "--name", NAME, "--zone", ZONE, "--type", "v9z-8",
                       "--version", "some-runtime")
    assert printed(result)[0][-4:] == ["--accelerator-type", "v9z-8", "--version", "some-runtime"]
    assert "warning: unknown TPU family 'v9z'" in result.stderr


def test_without_gcloud_a_real_run_says_so(tmp_path):
    tools = tmp_path / "tools"  # only what the script needs before it looks for gcloud
    tools.mkdir()
    for tool in ["dirname"]:
        (tools / tool).symlink_to(shutil.which(tool))
    env = script_env(tools, tmp_path, PATH=str(tools))
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), "delete", "--name", NAME, "--zone", ZONE], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "gcloud is not on PATH" in result.stderr


# --------------------------------------------------------------------------------------------------------
# The remote lines, run against a simulated one-worker TPU VM

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--command" in args:
    sys.exit(subprocess.run(["bash", "-c", args[args.index("--command") + 1]]).returncode)
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
if "describe" in args:
    states = os.environ["FAKE_QR_STATES"].split(",")
    counter = os.environ["FAKE_GCLOUD_LOG"] + ".describes"
    seen = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(seen + 1))
    print(states[min(seen, len(states) - 1)])
"""


@pytest.fixture
def worker(tmp_path: Path):
    """(run, repo, home): a copy of the script in a small checkout `repo`, and a fake gcloud that plays one TPU
    worker whose home directory is `home`. run.calls() lists the gcloud calls made so far."""
    repo = tmp_path / "repo"
    for path, text in {"setup.cfg": "[metadata]\nname = dalle_jax\n", "requirements.txt": "jax\n",
                       "dalle_jax/cli.py": "# code\n", "dalle_jax/__pycache__/cli.pyc": "cache",
                       ".git/HEAD": "ref: refs/heads/main\n", "runs/demo/checkpoint": "local run"}.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    shutil.copy2(SCRIPT, repo / "tpu_setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "gcloud.jsonl"

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        env = script_env(bin_dir, home, **{"FAKE_GCLOUD_LOG": str(log), "FAKE_QR_STATES": "ACTIVE",
                                           "TMPDIR": str(tmp_path), **extra})
        return subprocess.run(["bash", str(repo / "tpu_setup.sh"), "--name", NAME, "--zone", ZONE, *args], env=env,
                              capture_output=True, text=True, timeout=60)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    run.calls = calls
    return run, repo, home


def test_real_runs_execute_exactly_what_dry_runs_print(worker):
    run, _, _ = worker
    for args in (["create", "--type", "v4-32", "--queued", "--spot"], ["delete", "--queued"], ["logs"],
                 ["ssh", "--worker", "1"]):
        dry = run("--dry-run", *args)
        before = len(run.calls())
        run(*args)  # some fail on the fake worker (no logs yet); what matters is what was called
        assert run.calls()[before:] == [c[1:] for c in printed(dry)], args


def test_queued_create_waits_for_active_and_times_out(worker):
    run, repo, _ = worker
    result = run("create", "--type", "v5p-32", "--queued", FAKE_QR_STATES="ACCEPTED,WAITING_FOR_RESOURCES,ACTIVE",
                 TPU_POLL="0")
    assert result.returncode == 0, result.stderr
    assert sum("describe" in call for call in run.calls()) == 3 and "is ACTIVE" in result.stderr
    (repo.parent / "gcloud.jsonl.describes").unlink()
    result = run("create", "--type", "v5p-32", "--queued", "--timeout", "0", FAKE_QR_STATES="WAITING_FOR_RESOURCES")
    assert result.returncode == 1 and "still 'WAITING_FOR_RESOURCES' after 0 s" in result.stderr
    result = run("create", "--type", "v5p-32", "--queued", FAKE_QR_STATES="FAILED")
    assert result.returncode == 1 and "is FAILED" in result.stderr


@pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("tar") is None, reason="needs setsid and tar")
def test_copy_run_logs_stop_on_a_simulated_worker(worker):
    run, repo, home = worker
    code = home / "dalle_jax"
    (code / "runs").mkdir(parents=True)
    (code / "runs" / "checkpoint").write_text("the worker's own run")
    (code / "stale.py").write_text("deleted upstream")

    result = run("copy")
    assert result.returncode == 0, result.stderr
    copied = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    # The checkout without .git, caches and its runs/; the worker's runs/ kept, files deleted upstream gone.
    assert copied == ["dalle_jax/cli.py", "requirements.txt", "runs/checkpoint", "setup.cfg", "tpu_setup.sh"]
    assert (code / "runs" / "checkpoint").read_text() == "the worker's own run"
    assert not (home / "dalle_jax_upload.tar.gz").exists()
    assert not list(repo.parent.glob("dalle_jax_upload.*"))  # the local tarball is removed too

    # A stand-in venv: its activate script marks the environment, so the test sees that it was sourced.
    (home / "dalle_jax_venv" / "bin").mkdir(parents=True)
    (home / "dalle_jax_venv" / "bin" / "activate").write_text("export FAKE_VENV=active\n")
    probe = 'echo "$FAKE_VENV $JAX_PLATFORMS $PWD [$1]"; exec sleep 30'
    result = run("run", "--", "bash", "-c", probe, "_", "it's two words")
    assert result.returncode == 0, result.stderr
    [log] = (home / "dalle_jax_logs").glob("*.log")
    assert STAMP.fullmatch(log.stem)
    expected = f"active tpu {code} [it's two words]"
    for _ in range(100):
        if log.read_text().strip():
            break
        time.sleep(0.05)
    assert log.read_text().strip() == expected

    result = run("logs")
    assert result.returncode == 0 and expected in result.stdout and log.name in result.stdout

    pid = int(log.with_suffix(".pid").read_text())
    assert alive(pid)
    result = run("stop")
    assert result.returncode == 0 and f"sent SIGTERM to process group {pid}" in result.stdout
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck) - lint skipped")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)
