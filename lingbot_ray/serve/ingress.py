"""The ingress: one Starlette app with the protocol's endpoints, the API key and CORS.

- ``GET /v1/models``, ``GET /v1/models/{id}``: the model card (docs/PROTOCOL.md), CORS-readable.
- ``WS /v1/realtime_video/generate``: one :class:`SessionDriver` per socket.
- ``POST /v1/videos``: a whole clip from a script, as one MP4 (:mod:`.videos`).
- ``POST /v1/realtime_video/webrtc``: a realtime session whose frames go as WebRTC video
  (:mod:`.webrtc`; its module is imported on the first offer, so an ingress without aiortc serves
  everything else).
- ``/``: the static WebUI folder, when one is configured or shipped.

Every endpoint checks the optional API key: ``Authorization: Bearer <key>``, ``x-api-key: <key>``,
or ``?api_key=<key>`` (browsers cannot set headers on a WebSocket handshake). A refused socket is
accepted, told why and closed with 1008.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import pathlib
import sys
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from lingbot_ray.checkpoint import CheckpointFacts, ensure_checkpoint
from lingbot_ray.protocol import ACTIONS, AuthError, ModelCard, ModelList, model_not_found, outcome_for, encode_server_message

from .backend import StageBackend, replica_tag
from .config import ServeConfig
from .media import MediaPolicy
from .session import SessionDriver, SessionSettings, Slots, StreamingSession
from .videos import ClipRunner

logger = logging.getLogger("ray.serve")

_PACKAGED_WEBUI = pathlib.Path(__file__).resolve().parents[1] / "webui"


def _json(data: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json")


class Ingress:
    """Plain class: :func:`lingbot_ray.serve.app.build_app` wraps it with ``serve.ingress()``; tests and
    the notebook can also serve it in-process with :meth:`asgi`."""

    def __init__(self, config: ServeConfig, backend: StageBackend, metrics=None):
        self._bound = config  # what user_config is laid over
        self.config = config
        self.backend = backend
        self.metrics = metrics
        # the checkpoint's facts come from its JSON files: this process never imports torch
        model = config.model
        folder = ensure_checkpoint(model.path, build_tiny_if_missing=model.build_tiny_if_missing, revision=model.revision, settings=model.checkpoint_settings, weights=False)
        self.checkpoint = CheckpointFacts.read(folder)
        self.model_name = config.served_name(self.checkpoint.defaults.served_model_name)
        self.card = ModelCard(
            id=self.model_name,
            num_gpus=math.ceil(config.dit.num_gpus_per_rank * config.dit.sequence_parallel_degree),
            dit_precision={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[config.model.dit_dtype],
        )
        self.replica_id = replica_tag()
        self.sessions = Slots(config.ingress.max_sessions, f"ingress {self.replica_id} carries sessions")
        self.waiting = Slots(config.ingress.max_pending_inits, f"ingress {self.replica_id} has sockets waiting for init")
        # every running session (WebSocket or WebRTC), for shut_down_sessions
        self.drivers: set[StreamingSession] = set()
        self.closing: str | None = None  # why this replica ends its sockets and takes no new ones
        self._apply(config)
        self.asgi = self._build_app()
        logger.info("ingress ready: model %s, api key %s", self.model_name, "on" if self._api_key else "off")

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's ``user_config``: the live knobs (limits, timeouts, media policy, API key) laid over
        the app's ``args``, in place; sessions already streaming keep the settings they started with."""
        self._apply(self._bound.with_live(user_config))
        changed = sorted(f"{section}.{name}" for section, values in (user_config or {}).items() for name in values)
        logger.info("ingress reconfigured: %s", ", ".join(changed) or "back to args")  # names only: a key is a secret

    def _apply(self, config: ServeConfig) -> None:
        self.config = config
        self.settings = SessionSettings(
            served_model=self.model_name,
            geometry=self.checkpoint.geometry,
            defaults=self.checkpoint.session_defaults(),
            limits=config.limits,
            media=MediaPolicy(
                allowed_dirs=tuple(config.media.allowed_dirs),
                allow_url_fetch=config.media.allow_url_fetch,
                max_bytes=config.media.max_bytes,
                fetch_timeout_s=config.media.fetch_timeout_s,
            ),
            max_message_bytes=config.ingress.max_message_bytes,
            max_chunks_in_flight=config.ingress.max_chunks_in_flight,
            stage_timeout_s=config.ingress.stage_timeout_s,
            init_timeout_s=config.ingress.init_timeout_s,
            rife_model_path=config.postprocess.rife_model_path,
            esrgan_model_path=config.postprocess.esrgan_model_path,
            model_dirs=tuple(config.postprocess.model_dirs),
        )
        self.sessions.limit = config.ingress.max_sessions
        self.waiting.limit = config.ingress.max_pending_inits
        self._api_key = config.ingress.resolved_api_key()

    def __serve_build_asgi_app__(self):
        return self.asgi

    def describe(self) -> dict[str, Any]:
        """This replica's session slots (tests, operators): streaming sessions and sockets that
        have not sent a valid init yet."""
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "sessions": self.sessions.used,
            "max_sessions": self.sessions.limit,
            "waiting_for_init": self.waiting.used,
            "max_pending_inits": self.waiting.limit,
            "max_chunks_in_flight": self.settings.max_chunks_in_flight,
            # the ingress stays light: none of the model stack in its process
            "model_modules": sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules),
        }

    # -- auth ------------------------------------------------------------------------------------

    def _authorized(self, headers, query_params) -> bool:
        if self._api_key is None:
            return True
        offered = query_params.get("api_key") or headers.get("x-api-key") or ""
        authorization = headers.get("authorization", "")
        if not offered and authorization.lower().startswith("bearer "):
            offered = authorization[7:].strip()
        return hmac.compare_digest(offered.encode(), self._api_key.encode())

    def _auth_middleware(self, app):
        """API key on every API endpoint and the WebSocket. The static WebUI files are public, so a
        person can open the page and type the key in; it carries no data of the server's."""

        async def guarded(scope, receive, send):
            public = scope["type"] == "http" and not scope["path"].startswith("/v1/")
            if scope["type"] in ("http", "websocket") and self._api_key is not None and not public:
                from starlette.datastructures import Headers, QueryParams

                if not self._authorized(Headers(scope=scope), QueryParams(scope.get("query_string", b""))):
                    if scope["type"] == "websocket":
                        websocket = WebSocket(scope, receive, send)
                        await websocket.accept()
                        outcome = outcome_for(AuthError("missing or wrong API key"))
                        await websocket.send_bytes(encode_server_message(outcome.error))
                        await websocket.close(code=int(outcome.close_code), reason=outcome.close_reason)
                        return
                    if scope["method"] != "OPTIONS":  # CORS preflights carry no credentials
                        response = _json({"error": {"message": "missing or wrong API key", "type": "authentication_error"}}, 401)
                        await response(scope, receive, send)
                        return
            await app(scope, receive, send)

        return guarded

    # -- routes ----------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return _json(ModelList(data=[self.card]))

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.model_name:
            return _json(model_not_found(model_id), 404)
        return _json(self.card)

    async def generate(self, websocket: WebSocket) -> None:
        await websocket.accept()
        driver = SessionDriver(websocket, self.backend, self.settings, self.metrics, sessions=self.sessions, waiting=self.waiting)
        self.drivers.add(driver)
        try:
            run = asyncio.ensure_future(driver.run())
            await asyncio.sleep(0)  # the driver is running: it can be told to go away
            if self.closing is not None:
                driver.go_away(self.closing)
            await run
        finally:
            self.drivers.discard(driver)

    async def shut_down_sessions(self, reason: str = "the service is stopping", timeout_s: float = 10.0) -> dict[str, Any]:
        """End every session of this replica (sockets with close 1001, WebRTC sessions with the same
        error) with ``reason``, and take no new one (docs/DEPLOYING.md, "Stopping"); returns once
        they are closed, or after ``timeout_s``."""
        self.closing = reason
        ended = len(self.drivers)
        for driver in list(self.drivers):
            driver.go_away(reason)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.drivers and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        logger.info("ingress %s: %d socket(s) told the server is going away (%s)", self.replica_id, ended, reason)
        return {"replica_id": self.replica_id, "ended": ended, "open": len(self.drivers)}

    async def videos(self, request: Request) -> Response:
        """A whole clip as one MP4 (:mod:`.videos`), on this replica's session slots."""
        return await ClipRunner(self.backend, self.settings, self.sessions, self.config.ingress.max_clip_chunks)(request)

    async def webrtc(self, request: Request) -> Response:
        """An SDP offer and an init in, the answer out; the session then streams over the peer
        connection (:mod:`.webrtc`), on this replica's session slots."""
        try:
            from .webrtc import WebRTCSignalling
        except ImportError as exc:
            logger.warning("POST /v1/realtime_video/webrtc: %s", exc)
            error = {"message": f"WebRTC is not available on this server: {exc}", "type": "server_error"}
            return _json({"error": error}, 501)
        signalling = WebRTCSignalling(
            self.backend, self.settings, self.sessions, self.config.ingress,
            metrics=self.metrics, sessions_open=self.drivers, closing=lambda: self.closing,
        )
        return await signalling(request)

    def _build_app(self):
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/actions", lambda request: _json(ACTIONS.describe()), methods=["GET"]),  # the camera action table
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/videos", self.videos, methods=["POST"]),
            Route("/v1/realtime_video/webrtc", self.webrtc, methods=["POST"]),
            WebSocketRoute("/v1/realtime_video/generate", self.generate),
        ]
        webui = pathlib.Path(self.config.ingress.webui_dir) if self.config.ingress.webui_dir else _PACKAGED_WEBUI
        if (webui / "index.html").is_file():
            routes.append(Mount("/", StaticFiles(directory=str(webui), html=True), name="webui"))
        router = Starlette(routes=routes)
        # CORS is the outer layer, so that a 401 is readable by a WebUI served from another origin.
        return CORSMiddleware(
            self._auth_middleware(router),
            allow_origins=self.config.ingress.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "x-api-key", "content-type"],
            expose_headers=["x-lingbot-clip"],
        )


class RayIngress(Ingress):
    """The ingress as a Serve replica: stage handles in, the Ray backend and metrics on. It lives here,
    not in ``app``, so that its replica imports no deployment module (no torch)."""

    def __init__(self, config: ServeConfig, text, dit, vae, post):
        from lingbot_ray.engine.chain import StageChain

        from .backend import RayBackend
        from .metrics import IngressMetrics

        super().__init__(config, RayBackend(StageChain(text, dit, vae, post)))
        # this replica's session slots are exported beside the stages' (lingbot_session_slots_*)
        self.metrics = IngressMetrics(self.model_name, slots=lambda: (self.sessions.used, self.sessions.limit))
