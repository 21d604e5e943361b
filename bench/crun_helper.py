"""Time `crun run` from inside a private mount namespace, one run per request line on stdin.

crun 1.8 rejects a hybrid cgroup layout when /sys/fs/cgroup/unified/cgroup.controllers is not
empty ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"). The harness
starts this helper with `unshare --mount --propagation private`, and the helper bind-mounts an
empty file over that one file. The bind exists only in the helper's mount namespace, so the host
and the engine still see the real file, and crun then manages the cgroup v1 hierarchies.

Usage: crun_helper.py EMPTY_FILE BUNDLE CRUN_ROOT. Each line on stdin runs one container and
prints one JSON line: {"seconds": time to the first stdout byte, "output": ..., "rc": ...}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from peers import time_first_byte

CONTROLLERS_FILE = "/sys/fs/cgroup/unified/cgroup.controllers"


def hide_v2_controllers(empty_file: str) -> None:
    if not os.path.exists(CONTROLLERS_FILE):
        return
    subprocess.run(["mount", "--bind", empty_file, CONTROLLERS_FILE], check=True)


def main(argv: list[str]) -> int:
    empty_file, bundle, crun_root = argv[1:4]
    hide_v2_controllers(empty_file)
    for run, _line in enumerate(sys.stdin, start=1):
        container_id = f"bench-{os.getpid()}-{run}"
        command = ["crun", "--root", crun_root, "run", "--bundle", bundle, container_id]
        result = time_first_byte(command)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
