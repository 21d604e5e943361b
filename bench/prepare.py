"""Install the runtimes the engine is compared with, and build an OCI bundle for crun."""

from __future__ import annotations

import json
import os
import subprocess

# The Debian packages of the peers: bwrap, crun, and unshare from util-linux.
PACKAGES = ("bubblewrap", "crun", "util-linux")
# The parent of crun's cgroup path, at the root of every v1 hierarchy. The run removes it at
# the end.
CRUN_CGROUP_PARENT = f"linuxworker-bench-{os.getpid()}"


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_packages(packages: tuple[str, ...] = PACKAGES) -> None:
    """Install the missing Debian packages with apt-get, updating the lists only on failure."""
    missing = missing_packages(packages)
    if not missing:
        return
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", *missing]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


def build_crun_bundle(bundle: str, rootfs: str, argv: list[str]) -> str:
    """Write an OCI bundle with ``rootfs`` as its read-only root; return its cgroup path.

    The config starts from `crun spec`, which as root gives pid, network, ipc, uts and mount
    namespaces, a small capability set and masked /proc paths. To that it adds a cgroup
    namespace, the engine's default memory and pids limits, and a cgroup path of its own.
    """
    os.makedirs(bundle, exist_ok=True)
    config_path = os.path.join(bundle, "config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    with open(config_path, encoding="utf-8") as file:
        config = json.load(file)
    config["root"] = {"path": rootfs, "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = argv
    config["hostname"] = "bench"
    linux = config["linux"]
    if not any(ns["type"] == "cgroup" for ns in linux["namespaces"]):
        linux["namespaces"].append({"type": "cgroup"})
    cgroup_path = f"/{CRUN_CGROUP_PARENT}/crun"
    linux["cgroupsPath"] = cgroup_path
    linux.setdefault("resources", {})
    linux["resources"]["memory"] = {"limit": 1024**3, "swap": 1024**3}
    linux["resources"]["pids"] = {"limit": 1024}
    with open(config_path, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=1)
    return cgroup_path


def remove_crun_cgroups() -> list[str]:
    """Remove the cgroup folders crun created under this run's parent; return those left."""
    left = []
    root = "/sys/fs/cgroup"
    for hierarchy in sorted(os.listdir(root)):
        parent = os.path.join(root, hierarchy, CRUN_CGROUP_PARENT)
        if not os.path.isdir(parent):
            continue
        for folder in (os.path.join(parent, "crun"), parent):
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass
            except OSError as error:
                left.append(f"{folder}: {error.strerror}")
    return left
