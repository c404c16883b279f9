"""The worker process: serves ``kvmesh.v1.Inference`` and ``kvmesh.v1.Worker`` (worker/servicers.py)
and, with ``--http-port``, the OpenAI HTTP API (worker/http_server.py) over one EngineClient, with
health, reflection, metrics and the Redis reporter.

Lifecycle: the port opens at once with health NOT_SERVING (so probes and clients get a clear
answer), the model loads in a thread, then health turns SERVING. SIGTERM/SIGINT drains: health
NOT_SERVING, new generations refused with UNAVAILABLE, in-flight ones finish within the grace
period and are aborted after it. A cancelled or expired call aborts its sequence in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmesh.redact import redact_url
from kvmesh.requests import MAX_REQUEST_BYTES
from kvmesh.rpc import RpcServer, host_port
from kvmesh.tls import ServerTls
from kvmesh.v1 import inference_pb2_grpc, worker_pb2_grpc
from kvmesh.worker.http_server import make_http_server
from kvmesh.worker.metrics import WorkerMetrics
from kvmesh.worker.servicers import InferenceServicer, WorkerServicer, WorkerState, close_subscription

SERVICE_NAMES = ("kvmesh.v1.Inference", "kvmesh.v1.Worker")

if TYPE_CHECKING:
    from kvmesh.worker.engine.client import EngineClient

logger = logging.getLogger("kvmesh.worker.server")


@dataclass(slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    worker_id: str = ""
    advertise_address: str = ""  # host:port others dial; default host:port
    deployment: str = "default"
    redis_url: str = ""
    metrics_port: int = 0  # 0: no metrics endpoint
    shutdown_grace: float = 25.0  # seconds in-flight requests get after SIGTERM
    http_port: int | None = None  # OpenAI-compatible HTTP API and /metrics; None: off, 0: any port
    max_request_bytes: int = MAX_REQUEST_BYTES  # larger requests: INVALID_ARGUMENT (HTTP 413)
    tls: ServerTls = field(default_factory=ServerTls)  # gRPC port: TLS, or mTLS with a client CA


async def load_in_thread(factory: Callable[[], EngineClient]) -> EngineClient:
    """Runs the slow model load in a daemon thread, so SIGTERM during loading still exits promptly."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[EngineClient] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            engine = factory()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, engine, None)

    threading.Thread(target=target, name="kvmesh-model-load", daemon=True).start()
    return await future


def default_advertise_address(host: str, port: int) -> str:
    """host:port for others to dial; a wildcard listen address is replaced by this host's address."""
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return host_port(host, port)
    try:
        return host_port(socket.gethostbyname(socket.gethostname()), port)
    except OSError:
        return host_port(socket.gethostname(), port)


async def serve(options: ServerOptions, engine_factory: Callable[[], EngineClient]) -> int:
    """Serves until SIGTERM/SIGINT, then drains; returns the process exit code."""
    metrics = WorkerMetrics()
    state = WorkerState(options.worker_id, metrics)
    state.max_request_bytes = options.max_request_bytes
    rpc = RpcServer(
        SERVICE_NAMES,
        [
            lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(state), s),
            lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(state), s),
        ],
        max_request_bytes=options.max_request_bytes,
    )
    http = make_http_server(state, options.tls) if options.http_port is not None else None
    try:
        address = await rpc.start(options.host, options.port, options.tls)
        http_port = await http.start(options.host, options.http_port) if http is not None else 0
    except (RuntimeError, OSError, ValueError) as e:
        logger.error("Failed to bind host=%s port=%d error=%s", options.host, options.port, e)
        await rpc.server.stop(0)
        return 1
    port = rpc.port
    metrics_port = metrics.serve(options.host, options.metrics_port) if options.metrics_port else 0
    logger.info(
        "Loading model address=%s http_port=%d worker_id=%s metrics_port=%d",
        address, http_port, options.worker_id, metrics_port,
    )  # fmt: skip

    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # a second signal skips the grace period
        (force if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def close_fronts() -> None:
        await rpc.server.stop(0)
        if http is not None:
            await http.stop()
        metrics.close()

    load = asyncio.ensure_future(load_in_thread(engine_factory))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        logger.info("Stopped before the model loaded")
        load.cancel()
        await close_fronts()
        return 0
    try:
        engine = load.result()
        await engine.start()
    except Exception:
        logger.exception("Failed to load the model")
        await close_fronts()
        return 1
    state.engine = engine
    metrics.bind(engine)
    try:
        reporter, reporter_task = await start_reporter(options, engine, port)
    except Exception as e:  # e.g. an unreadable password file; never the URL itself (a secret)
        logger.error(
            "Failed to start the Redis reporter redis_url=%s error=%s", redact_url(options.redis_url), e
        )
        await engine.shutdown()
        await close_fronts()
        return 1
    if reporter is not None:  # Ready only once registered: a worker no gateway can find is not ready
        # Loaded and able to serve: the named services say so at once (liveness and startup probes
        # ask for kvmesh.v1.Worker); the overall status "" (readiness) waits for the registration.
        await rpc.set_serving(True, SERVICE_NAMES)
        registered = asyncio.ensure_future(reporter.registered.wait())
        await asyncio.wait({registered, stopping}, return_when=asyncio.FIRST_COMPLETED)
        registered.cancel()
    if not stop.is_set():
        state.ready = True
        await rpc.set_serving(True)
        logger.info(
            "Worker ready address=%s http_port=%d model=%s max_model_len=%d worker_id=%s metrics_port=%d",
            address, http_port, engine.model_name, engine.max_model_len, options.worker_id, metrics_port,
        )  # fmt: skip

    # An engine thread that dies while idle still takes the worker down (and health with it).
    watch = asyncio.ensure_future(engine.wait_failed())
    watch.add_done_callback(lambda t: t.cancelled() or state.engine_failed.set())
    failed = asyncio.ensure_future(state.engine_failed.wait())
    await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if not stop.is_set():  # the engine died: stop now, so the orchestrator restarts the worker
        logger.error("Engine stopped unexpectedly; shutting down worker_id=%s", options.worker_id)
        exit_code = 1
        force.set()
    stopping.cancel()
    failed.cancel()
    watch.cancel()
    await drain(options, state, rpc, reporter, reporter_task, force)
    if http is not None:
        await http.stop()
    await engine.shutdown()
    metrics.close()
    logger.info("Worker stopped worker_id=%s exit_code=%d", options.worker_id, exit_code)
    return exit_code


async def start_reporter(options: ServerOptions, engine: EngineClient, port: int) -> tuple[Any, Any]:
    if not options.redis_url:
        return None, None
    from kvmesh.worker.reporter import Reporter  # lazy: only workers that report need redis

    advertised = options.advertise_address or default_advertise_address(options.host, port)
    reporter = Reporter(
        engine, options.redis_url, options.deployment, options.worker_id, advertised, engine.model_name
    )
    task = asyncio.ensure_future(reporter.run())
    logger.info(
        "Reporting to Redis at %s deployment=%s advertise_address=%s",
        redact_url(options.redis_url), options.deployment, advertised,
    )  # fmt: skip
    return reporter, task


async def drain(
    options: ServerOptions,
    state: WorkerState,
    rpc: RpcServer,
    reporter: Any,
    reporter_task: Any,
    force: asyncio.Event,
) -> None:
    """Health NOT_SERVING, refuse new work, let in-flight requests finish (abort them after the grace)."""
    state.draining = True  # both fronts refuse new generations from here on
    await rpc.health.enter_graceful_shutdown()
    logger.info("Draining in_flight=%d grace=%.0fs", len(state.in_flight), options.shutdown_grace)
    if reporter is not None:  # deregister first, so gateways stop routing here
        reporter_task.cancel()
        with contextlib.suppress(BaseException):
            await reporter_task
        try:
            await reporter.close()
        except Exception:
            logger.exception("Failed to deregister from Redis")
    idle, forced = asyncio.ensure_future(state.idle.wait()), asyncio.ensure_future(force.wait())
    await asyncio.wait({idle, forced}, timeout=options.shutdown_grace, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    forced.cancel()
    if state.in_flight:
        logger.warning("Aborting unfinished requests in_flight=%d", len(state.in_flight))
        for request_id in list(state.in_flight):
            state.engine.abort(request_id)  # type: ignore[union-attr]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.idle.wait(), 5.0)
    for subscription in list(state.subscriptions):
        with contextlib.suppress(Exception):
            await close_subscription(subscription)
    await rpc.server.stop(1.0)
