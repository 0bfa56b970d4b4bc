"""The committed gRPC stubs are exactly what grpcio-tools makes of engine.proto now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "services" / "llm_common" / "proto" / "v1"


def test_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            "-Illm_common/proto/v1=proto/llm/engine/v1",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
            "proto/llm/engine/v1/engine.proto",
        ],
        cwd=ROOT, check=True,
    )  # fmt: skip
    for name in ("engine_pb2.py", "engine_pb2.pyi", "engine_pb2_grpc.py"):
        fresh = (tmp_path / "llm_common" / "proto" / "v1" / name).read_text()
        assert (STUBS / name).read_text() == fresh, f"{name} is stale: run `make proto`"


def test_the_engine_service_name_is_the_protos() -> None:
    from llm_common.proto import ENGINE_SERVICE
    from llm_common.proto.v1 import engine_pb2 as pb

    assert pb.DESCRIPTOR.services_by_name["Engine"].full_name == ENGINE_SERVICE
