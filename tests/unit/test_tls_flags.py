"""TLS flags that cannot work stop the gateway and the worker at once, with one line naming the flag:
a certificate without its key or CA must never mean plaintext in silence, and a Secret key missing
from its mount must not surface later as failing connections."""

from __future__ import annotations

import argparse

import pytest
from test_cli_errors import imported, kvmesh, messages

from kvmesh.gateway import cli as gateway_cli
from kvmesh.tls import flags_error


def gateway_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gateway_cli.configure(parser)
    return parser.parse_args(["--worker", "127.0.0.1:1", *argv])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--tls-cert", "{pem}"], "--tls-cert needs --tls-key"),
        (["--tls-client-ca", "{pem}"], "--tls-client-ca needs --tls-cert"),
        (
            ["--worker-tls-cert", "{pem}", "--worker-tls-key", "{pem}"],
            "--worker-tls-cert needs --worker-tls-ca",
        ),
        (["--worker-tls-server-name", "w"], "--worker-tls-server-name needs --worker-tls-ca"),
        (
            ["--worker-tls-ca", "{missing}"],
            "cannot read --worker-tls-ca {missing}: No such file or directory",
        ),
        (["--tls-cert", "{pem}", "--tls-key", "{missing}"], "cannot read --tls-key {missing}"),
    ],
)
def test_gateway_tls_flags(tmp_path, argv: list[str], error: str) -> None:
    pem, missing = tmp_path / "tls.crt", tmp_path / "absent" / "ca.crt"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    argv = [a.format(pem=pem, missing=missing) for a in argv]
    assert flags_error(gateway_args(*argv)).startswith(error.format(missing=missing))


def test_complete_flags_pass(tmp_path) -> None:
    pem = str(tmp_path / "tls.crt")
    (tmp_path / "tls.crt").write_text("pem")
    full = ["--tls-cert", pem, "--tls-key", pem, "--tls-client-ca", pem, "--worker-tls-ca", pem]
    full += ["--worker-tls-cert", pem, "--worker-tls-key", pem, "--worker-tls-server-name", "w"]
    assert flags_error(gateway_args(*full)) == ""
    assert flags_error(gateway_args()) == ""  # plaintext


def test_processes_refuse_unreadable_certificates_before_starting(tmp_path) -> None:
    missing = str(tmp_path / "absent.crt")
    result = kvmesh("gateway", "--port", "0", "--worker", "127.0.0.1:1", "--worker-tls-ca", missing)
    assert result.returncode == 2
    assert messages(result) == [
        f"kvmesh gateway: cannot read --worker-tls-ca {missing}: No such file or directory"
    ]
    result = kvmesh("worker", "--port", "0", "--http-port", "0", "--tls-cert", missing, "--tls-key", missing)
    assert result.returncode == 2 and not imported(result, "torch")
    assert messages(result)[-1].endswith(f"cannot read --tls-cert {missing}: No such file or directory")
