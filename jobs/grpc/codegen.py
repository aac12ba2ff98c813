"""The gRPC service's code, generated from its .proto with grpcio-tools: `make` runs
this module (`python -m jobs.grpc.codegen`) before anything imports the service (make
install, run, test). Nothing generated is committed or edited by hand.

The .proto's path under protos/ is the Python package it lands in
(`grpc_services.generated`, the import path seed 004's clients use).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from importlib import resources
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[2]
PROTO_ROOT = BASE_DIR / "protos"
PROTO = PROTO_ROOT / "grpc_services" / "generated" / "orchestrator.proto"
GENERATED_ROOT = BASE_DIR / "grpc_services"
GENERATED = GENERATED_ROOT / "generated"
GENERATED_FILES = ("orchestrator_pb2.py", "orchestrator_pb2.pyi", "orchestrator_pb2_grpc.py")


def _generated_code_is_current() -> bool:
    paths = [GENERATED / name for name in GENERATED_FILES]
    if not all(path.exists() for path in paths):
        return False
    return min(path.stat().st_mtime for path in paths) >= PROTO.stat().st_mtime


def generate_code() -> None:
    """Run protoc (grpcio-tools) on the .proto, unless the generated
    modules are there and newer than it."""
    if _generated_code_is_current():
        return
    from grpc_tools import protoc

    GENERATED.mkdir(parents=True, exist_ok=True)
    # Processes starting together (a test run, `serve`) generate once: the others wait
    # on the lock, then find the code current. Each file is written aside and moved in,
    # so a process importing meanwhile never reads half a module.
    with open(GENERATED_ROOT / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _generated_code_is_current():
            return
        with tempfile.TemporaryDirectory(dir=GENERATED_ROOT) as scratch:
            well_known = resources.files("grpc_tools") / "_proto"
            code = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{PROTO_ROOT}",
                    f"-I{well_known}",
                    f"--python_out={scratch}",
                    f"--pyi_out={scratch}",
                    f"--grpc_python_out={scratch}",
                    str(PROTO),
                ]
            )
            if code != 0:
                raise RuntimeError(f"protoc failed on {PROTO} (exit {code})")
            for package in (GENERATED_ROOT, GENERATED):
                (package / "__init__.py").touch(exist_ok=True)
            for name in GENERATED_FILES:
                os.replace(Path(scratch) / "grpc_services" / "generated" / name, GENERATED / name)


if __name__ == "__main__":
    generate_code()
