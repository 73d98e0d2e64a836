"""Runtime: everything one server process holds (model, engine, adapter store, metrics, lifecycle flags).

Built from the frozen configs; loaded in the background so the HTTP server answers /health and /ready
(503) while the model loads. The HTTP layer reads this object; the engine never sees HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.adapters.store import AdapterStore, StoreConfig
from loraplex.server.config import ModelConfig, ServerConfig
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.engine import EngineConfig, LLMEngine
from loraplex.server.metrics import Metrics
from loraplex.server.model_loader import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    model: ModelConfig
    engine: EngineConfig
    server: ServerConfig


class Runtime:
    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.loaded: LoadedModel | None = None
        self.engine: AsyncEngine | None = None
        self.store: AdapterStore | None = None
        self.metrics = Metrics(self)
        self.load_error: str | None = None
        self.fatal_error: str | None = None  # set once the process cannot serve any more (it then exits)
        self.on_fatal: Callable[[str], None] = lambda reason: None  # the CLI makes the process exit non-zero
        self.draining = False
        self.active_requests = 0  # admitted and not finished (HTTP side), for admission control
        self._admit_lock = threading.Lock()
        self.served_model_name = config.model.served_model_name or "loraplex-base"

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining and self.fatal_error is None

    def fatal(self, reason: str) -> None:
        """The process cannot serve any more (model load failed, engine thread died): say why and exit."""
        if self.fatal_error is None:
            self.fatal_error = reason
        log.critical("fatal: %s", reason)
        self.on_fatal(reason)

    def load(self) -> None:
        """Load the model, build the engine and the store, preload adapters, warm up. Blocking."""
        t0 = time.perf_counter()
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported on /health, /ready and in the log; then exit
            log.exception("startup failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.fatal(f"the model failed to load: {self.load_error}")
            return
        log.info("ready in %.1fs", time.perf_counter() - t0)

    def _load(self) -> None:
        cfg = self.config
        self.loaded = load_model(cfg.model)
        if cfg.model.served_model_name is None:
            self.served_model_name = self.loaded.model_dir.name
        engine = LLMEngine(self.loaded, cfg.engine, adapter_loader=lambda name: self.store.load_weights(name))
        self.store = AdapterStore(
            StoreConfig(cfg.server.state_dir, cfg.server.adapter_root, cfg.engine.lora.max_lora_rank,
                        cfg.server.max_upload_bytes, cfg.server.s3_endpoint),
            engine.lora.module_shapes(), cfg.engine.lora.max_loras)
        self.store.attach(engine.adapters)
        engine.adapters.on_load_seconds = self.metrics.observe_adapter_load
        self._preload()
        async_engine = AsyncEngine(engine)
        async_engine.on_step = self.metrics.observe_step
        async_engine.on_fatal = self.fatal
        async_engine.start()
        self.engine = async_engine

    def _preload(self) -> None:
        for name, path in self.config.server.preload:
            if name in self.store:
                log.info("preload %s: already registered (kept from --state-dir)", name)
                continue
            self.store.register_path(name, path)

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="loraplex-load", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # ---- admission -------------------------------------------------------------------------------
    def try_admit(self) -> bool:
        """Count one more in-flight HTTP request, unless the queue bound is reached (-> 429)."""
        with self._admit_lock:
            if self.active_requests >= self.config.server.max_queue:
                return False
            self.active_requests += 1
            return True

    def release(self) -> None:
        with self._admit_lock:
            self.active_requests -= 1
