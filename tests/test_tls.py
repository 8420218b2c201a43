"""A TLS listener (mosquitto/tls.conf.example) with a test CA: clients need the CA to get in."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from broker.mqtt.local_broker import SECURE_CONFIG, free_port, start_broker
from broker.mqtt.settings import MqttSettings
from tests.conftest import SECURE_USERS
from tests.support.loops import mqtt_connection


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=slb-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")
    for name in ("ca.crt", "server.crt", "server.key"):
        (folder / name).chmod(0o644)
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key")}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS test")
    folder = tmp_path_factory.mktemp("tls")
    folder.chmod(0o755)
    certs = make_certificates(folder)
    password_file = folder / "passwd"
    password_file.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(password_file), "coordinator", SECURE_USERS["coordinator"]],
                   check=True, capture_output=True)
    tls_port = free_port()
    example = (Path(__file__).resolve().parent.parent / "mosquitto" / "tls.conf.example").read_text()
    tls_listener = (example.replace("listener 8883 0.0.0.0", f"listener {tls_port} 127.0.0.1")
                    .replace("mosquitto/certs/ca.crt", str(certs["ca.crt"]))
                    .replace("mosquitto/certs/server.crt", str(certs["server.crt"]))
                    .replace("mosquitto/certs/server.key", str(certs["server.key"])))
    broker = start_broker(folder, port=free_port(), prefer="mosquitto", config=SECURE_CONFIG,
                          overrides={"password_file": str(password_file)}, extra_config=tls_listener)
    yield tls_port, certs
    broker.stop()


def test_client_with_the_ca_connects_over_tls(tls_broker) -> None:
    port, certs = tls_broker
    settings = MqttSettings(broker_url=f"mqtts://localhost:{port}", mqtt_tls_ca=certs["ca.crt"],
                            mqtt_username="coordinator", mqtt_password=SECURE_USERS["coordinator"])
    client = mqtt_connection(settings, "tls-ok", on_message=lambda m: None)
    client.start()
    try:
        assert client.wait_connected(10)
        assert client.publish_and_wait("slb/v1/coordinator/status", b'{"v":1,"ts":0,"state":"online"}') < 0x80
    finally:
        client.stop(timeout=1)


def test_client_without_the_ca_is_refused(tls_broker) -> None:
    port, _ = tls_broker
    settings = MqttSettings(broker_url=f"mqtts://localhost:{port}", mqtt_username="coordinator",
                            mqtt_password=SECURE_USERS["coordinator"])
    client = mqtt_connection(settings, "tls-no-ca", on_message=lambda m: None, reconnect_min_s=0.2)
    client.start()
    try:
        started = time.monotonic()
        assert not client.wait_connected(2)
        assert time.monotonic() - started >= 1.9
        assert client.connect_count == 0
    finally:
        client.stop(timeout=0.5)
