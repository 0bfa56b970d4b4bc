"""Who may call the engine: without the shared token every Engine RPC is UNAUTHENTICATED
(health stays open for probes); with TLS the gateway connects only with the right CA, and
with mutual TLS only with a client certificate the engine's CA signed. Real engine
processes, real gateways."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.integration.test_engine import GREEDY, start_engine

from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.security import bearer, channel_credentials
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

TOKEN = "engine-token-0123456789"


def _cert(name: str, issuer: tuple | None, out: Path, *, ca: bool = False) -> tuple:
    """A P-256 key and certificate for `name` (127.0.0.1 and localhost), signed by `issuer`
    (key, cert) or self-signed; written as OUT.crt and OUT.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, signer = issuer if issuer else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    out.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    out.with_suffix(".key").write_bytes(pem)
    return key, cert


def _completion(settings: GatewaySettings) -> int:
    with TestClient(create_app(settings)) as client:
        body = {"model": "tiny", "prompt": "The ", "max_tokens": 3, "temperature": 0}
        return client.post("/v1/completions", json=body).status_code


def test_engine_rpcs_need_the_token_and_health_does_not(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    env = {"LLM_ENGINE_AUTH_TOKEN": TOKEN}
    with start_engine(tiny_checkpoint, tmp_path / "engine.log", env=env) as engine:
        request = pb.GenerateRequest(text="The ", sampling=GREEDY,
                                     stopping=pb.StoppingCriteria(max_tokens=3))  # fmt: skip
        for metadata in ((), bearer("wrong-token"), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                list(engine.stub.Generate(request, timeout=30, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            engine.stub.ModelInfo(pb.ModelInfoRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(engine.stub.Generate(request, timeout=30, metadata=bearer(TOKEN)))
        assert sum(len(c.token_ids) for c in chunks) == 3
        health = health_pb2_grpc.HealthStub(engine.channel)  # probes carry no token
        reply = health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        target = f"127.0.0.1:{engine.port}"
        assert _completion(GatewaySettings(engine=target, engine_token=TOKEN)) == 200
        assert _completion(GatewaySettings(engine=target)) >= 500  # no token: refused


def test_mutual_tls_admits_only_the_right_ca_and_client(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    ca = _cert("engine-ca", None, tmp_path / "ca", ca=True)
    _cert("engine", ca, tmp_path / "engine")
    client_ca = _cert("gateway-ca", None, tmp_path / "client-ca", ca=True)
    _cert("gateway", client_ca, tmp_path / "gateway")
    _cert("other-ca", None, tmp_path / "other-ca", ca=True)
    rogue_ca = _cert("rogue-ca", None, tmp_path / "rogue-ca", ca=True)
    _cert("rogue", rogue_ca, tmp_path / "rogue")
    env = {"LLM_ENGINE_TLS_CERT": str(tmp_path / "engine.crt"),
           "LLM_ENGINE_TLS_KEY": str(tmp_path / "engine.key"),
           "LLM_ENGINE_TLS_CLIENT_CA": str(tmp_path / "client-ca.crt")}  # fmt: skip
    mine = channel_credentials(
        tmp_path / "ca.crt", tmp_path / "gateway.crt", tmp_path / "gateway.key"
    )
    with start_engine(tiny_checkpoint, tmp_path / "engine.log", env=env, tls=mine) as engine:
        target = f"127.0.0.1:{engine.port}"

        def gateway(ca: str, client: str | None) -> GatewaySettings:
            tls = {"engine_tls_ca": tmp_path / f"{ca}.crt"}
            if client:
                tls |= {"engine_tls_cert": tmp_path / f"{client}.crt",
                        "engine_tls_key": tmp_path / f"{client}.key"}  # fmt: skip
            return GatewaySettings(engine=target, **tls)

        assert _completion(gateway("ca", "gateway")) == 200
        assert _completion(gateway("other-ca", "gateway")) == 503  # the engine's CA unknown
        assert _completion(gateway("ca", None)) == 503  # no client certificate
        assert _completion(gateway("ca", "rogue")) == 503  # one the engine's CA did not sign
        assert _completion(GatewaySettings(engine=target)) == 503  # plaintext
