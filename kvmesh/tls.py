"""TLS and mutual TLS for kvmesh's hops (client -> gateway, gateway -> worker; gRPC and the OpenAI
HTTP API), from PEM files (a mounted Kubernetes Secret, e.g. one cert-manager issues: ``tls.crt``,
``tls.key``, ``ca.crt``).

A server given a certificate and key serves TLS; given a client CA as well, it requires and checks
client certificates (mTLS). A client given a CA verifies the server against it; given a certificate
and key as well, it presents them. Worker pods are dialed by IP, which certificates rarely name, so
the gateway can verify workers against one fixed name (``server_name``, e.g. the workers' Service).
A client's API key (``Authorization: Bearer``) travels only over TLS, as gRPC's call credentials do.

Servers pick up renewed files without a restart (cert-manager renews a Secret in place and the
kubelet swaps the mounted files): gRPC checks them before each new connection's handshake, the HTTP
front every few seconds; connections already open keep their session.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # grpc loads with the servers, not with the CLIs that define these flags
    import grpc


log = logging.getLogger("kvmesh.tls")


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class FileStamps:
    """Notices replaced files (inode, mtime, size), as a Secret volume's atomic swap replaces them."""

    def __init__(self, *paths: str) -> None:
        self.paths = [p for p in paths if p]
        self.last = self.read()

    def read(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)


@dataclass(slots=True)
class ServerTls:
    cert: str = ""  # PEM certificate chain; empty: plaintext
    key: str = ""
    client_ca: str = ""  # PEM CA bundle; set: clients must present a certificate it signed (mTLS)

    def credentials(self) -> grpc.ServerCredentials | None:
        """The gRPC port's credentials; renewed files take effect at the next connection."""
        import grpc

        if not self.cert:
            return None
        if not self.key:
            raise ValueError("a TLS certificate needs its key (--tls-key)")

        def configuration() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(_read(self.key), _read(self.cert))], root_certificates=_read(self.client_ca)
            )

        initial = configuration()
        stamps = self.stamps()

        def renewed() -> grpc.ServerCertificateConfiguration | None:
            # gRPC calls this before every handshake: three stat calls, files read only on a change.
            now = stamps.read()
            if now == stamps.last:
                return None
            try:
                self.ssl_context()  # the pair must load and match before gRPC gets it
                renewed_configuration = configuration()
            except (OSError, ValueError) as e:
                log.warning("Kept the current TLS certificate; the new files do not load error=%s", e)
                return None
            stamps.last = now
            log.info("Reloaded the TLS certificate port=grpc cert=%s", self.cert)
            return renewed_configuration

        return grpc.dynamic_ssl_server_credentials(
            initial, renewed, require_client_authentication=bool(self.client_ca)
        )

    def stamps(self) -> FileStamps:
        return FileStamps(self.cert, self.key, self.client_ca)

    def reload(self, context: ssl.SSLContext, stamps: FileStamps) -> bool:
        """Loads renewed files into ``context``, so new handshakes use them; False when nothing
        changed or the new files do not load (the current certificate stays)."""
        now = stamps.read()
        if now == stamps.last:
            return False
        try:
            self.ssl_context()  # load and match the pair in a scratch context first
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(cafile=self.client_ca)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.warning("Kept the current TLS certificate; the new files do not load error=%s", e)
            return False
        stamps.last = now
        log.info("Reloaded the TLS certificate port=http cert=%s", self.cert)
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP front's context: the same certificate as the gRPC port (None: plain HTTP).

        With a client CA, a certificate a client presents must chain to it (the handshake fails
        otherwise), but presenting none is allowed here: the HTTP front then refuses every path but
        ``/health`` and ``/ready`` (``requires_client_cert``), so the kubelet's HTTPS probes, which
        carry no certificate, still reach them."""
        if not self.cert:
            return None
        if not self.key:
            raise ValueError("a TLS certificate needs its key (--tls-key)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    @property
    def requires_client_cert(self) -> bool:
        return bool(self.cert and self.client_ca)


@dataclass(slots=True)
class ClientTls:
    ca: str = ""  # PEM CA bundle the server's certificate must chain to; empty: plaintext
    cert: str = ""  # client certificate for mTLS (with ``key``)
    key: str = ""
    server_name: str = ""  # name to verify instead of the dialed host (workers are dialed by IP)
    system_roots: bool = False  # TLS verified against the system's CAs when no ``ca`` is given

    @property
    def enabled(self) -> bool:
        return bool(self.ca) or self.system_roots

    def _secure(
        self, options: list[tuple[str, int | str]], api_key: str
    ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, int | str]]]:
        import grpc

        if not self.enabled:
            if api_key:
                raise ValueError("an API key is sent only over TLS: give --tls-ca (or --tls)")
            return None, options
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )
        if api_key:  # sent as ``authorization: Bearer <key>`` metadata on every call
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(api_key)
            )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return credentials, options

    def channel(
        self, address: str, options: list[tuple[str, int | str]], api_key: str = ""
    ) -> grpc.aio.Channel:
        import grpc

        credentials, options = self._secure(options, api_key)
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def sync_channel(self, address: str, api_key: str = "") -> grpc.Channel:
        import grpc

        credentials, options = self._secure([], api_key)
        if credentials is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, credentials, options=options)


def add_server_flags(parser) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca``: one definition for worker and gateway."""
    parser.add_argument(
        "--tls-cert", default="", help="PEM certificate: serve gRPC over TLS (with --tls-key)"
    )
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca", default="", help="PEM CA bundle: require client certificates it signed (mTLS)"
    )


def server_tls(args) -> ServerTls:
    return ServerTls(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def add_worker_client_flags(parser) -> None:
    """How a gateway dials its workers."""
    parser.add_argument("--worker-tls-ca", default="", help="PEM CA bundle: dial workers over TLS, verified")
    parser.add_argument("--worker-tls-cert", default="", help="PEM client certificate for workers (mTLS)")
    parser.add_argument("--worker-tls-key", default="", help="PEM private key of --worker-tls-cert")
    parser.add_argument(
        "--worker-tls-server-name",
        default="",
        help="name the workers' certificate carries (they are dialed by IP)",
    )


def worker_client_tls(args) -> ClientTls:
    return ClientTls(
        ca=args.worker_tls_ca, cert=args.worker_tls_cert, key=args.worker_tls_key,
        server_name=args.worker_tls_server_name,
    )  # fmt: skip


def add_client_flags(parser) -> None:
    """How ``kvmesh generate`` and ``kvmesh chat`` reach a gateway or worker over TLS."""
    parser.add_argument(
        "--tls-ca", default=os.environ.get("KVMESH_TLS_CA", ""),
        help="PEM CA bundle: connect over TLS, verifying the server against it (env KVMESH_TLS_CA)",
    )  # fmt: skip
    parser.add_argument("--tls", action="store_true", help="connect over TLS, verified by the system's CAs")
    parser.add_argument(
        "--tls-cert", default=os.environ.get("KVMESH_TLS_CERT", ""),
        help="PEM client certificate, for servers that require one (mTLS; env KVMESH_TLS_CERT)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-key", default=os.environ.get("KVMESH_TLS_KEY", ""),
        help="PEM private key of --tls-cert (env KVMESH_TLS_KEY)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-server-name", default="", help="name to verify in the server's certificate (default: the host)"
    )


def client_tls(args) -> ClientTls:
    return ClientTls(
        ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name,
        system_roots=args.tls,
    )  # fmt: skip


def api_key_from_env() -> str:
    """The gateway API key of a client, from env only (``KVMESH_API_KEY``): never in argv."""
    return os.environ.get("KVMESH_API_KEY", "").strip()


# flag -> the flags it needs; checked by the CLIs before anything starts.
_NEEDS = {
    "--tls-cert": ("--tls-key",),
    "--tls-key": ("--tls-cert",),
    "--tls-client-ca": ("--tls-cert",),
    "--worker-tls-cert": ("--worker-tls-key", "--worker-tls-ca"),
    "--worker-tls-key": ("--worker-tls-cert",),
    "--worker-tls-server-name": ("--worker-tls-ca",),
}
_FILES = (
    "--tls-cert", "--tls-key", "--tls-client-ca", "--worker-tls-ca", "--worker-tls-cert", "--worker-tls-key",
)  # fmt: skip


def flags_error(args) -> str:
    """One line naming the first TLS flag given without a flag it needs, or whose file cannot be
    read ("" when all is well). A certificate left out must never mean plaintext in silence, and a
    Secret key missing from a mount should stop the process at once, by name."""
    given = {flag: getattr(args, flag[2:].replace("-", "_"), "") or "" for flag in (*_NEEDS, *_FILES)}
    for flag, needs in _NEEDS.items():
        missing = [n for n in needs if not given[n]]
        if given[flag] and missing:
            return f"{flag} needs {' and '.join(missing)}"
    for flag in _FILES:
        if given[flag]:
            try:
                Path(given[flag]).read_bytes()
            except OSError as e:
                return f"cannot read {flag} {given[flag]}: {e.strerror or e}"
    return ""
