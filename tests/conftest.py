"""Every test runs on 8 simulated CPU devices; this must happen before jax initialises."""

import os
import subprocess
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`dalle-jax demo --quick` once per session: (run directory, completed process). Tests that read it share it."""
    run = tmp_path_factory.mktemp("demo") / "quick"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-m", "dalle_jax.cli", "demo", "--quick", "--out", str(run), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return run, result


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's `pytest -n 2 --dist loadgroup`) each test file runs whole on one worker, so
    its module fixtures (quick sweeps, trained runs) are built once; the files that read the session's quick demo
    share one worker, so the demo too is trained once. Without xdist this adds nothing."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    demo_modules = {item.module.__name__ for item in items if "quick_demo" in getattr(item, "fixturenames", ())}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("quick_demo" if module in demo_modules else module))
