"""The committed generated code matches the .proto files (regenerate: python proto/generate.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_import_inside_the_package() -> None:
    from stream._pb import admin_pb2_grpc, broker_pb2, broker_pb2_grpc

    assert broker_pb2.DESCRIPTOR.package == "riverlog.v1"
    assert hasattr(broker_pb2_grpc, "BrokerServicer")
    assert hasattr(admin_pb2_grpc, "AdminStub")
