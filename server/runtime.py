"""Runtime: everything one server process holds (model, engine, adapter store, metrics, lifecycle flags).

Built from the frozen configs; loaded in the background so the HTTP server answers /health and /ready
(503) while the model loads. The HTTP layer reads this object; the engine never sees HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loraplex.adapters.digest import dir_digest
from loraplex.adapters.errors import AdapterConflictError
from loraplex.adapters.merge import is_virtual
from loraplex.adapters.registry_poller import RegistryPoller
from loraplex.adapters.resolver import AdapterResolver
from loraplex.adapters.slot_table import SlotTable
from loraplex.adapters.sources.base import ADAPTER_FILES
from loraplex.adapters.store import AdapterStore, StoreConfig
from loraplex.server.api.quotas import TenantQuotas
from loraplex.server.config import ModelConfig, ServerConfig
from loraplex.server.demo import DEMO_ADAPTERS, DEMO_MODEL_NAME
from loraplex.server.engine.async_engine import AsyncEngine
from loraplex.server.engine.engine import EngineConfig, LLMEngine
from loraplex.server.generation_config import sampling_defaults
from loraplex.server.metrics import Metrics
from loraplex.server.model_loader import LoadedModel, load_model
from loraplex.server.tenants import DEFAULT, OPERATOR, TenantDirectory, TenantTable, key_digest
from loraplex.server.usage import UsageBook

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
        self.resolver: AdapterResolver | None = None  # with --adapter-resolver: registers names on first use
        self.poller: RegistryPoller | None = None  # with a shared registry (--registry s3://…)
        # --tenants: the table in use (reloaded on SIGHUP and when the file changes); ValueError naming the file and
        # line when it is unusable at start. Metering and quotas are kept per tenant ("default" without a file).
        self.tenants = (TenantDirectory(config.server.tenants, _reserved_digests(config.server))
                        if config.server.tenants is not None else None)
        self.usage = UsageBook()
        self.quotas = TenantQuotas(self.usage)
        if self.tenants is not None:
            self.tenants.on_change = self._tenants_changed
        self.metrics = Metrics(self)
        self.load_error: str | None = None
        self.fatal_error: str | None = None  # set once the process cannot serve any more (it then exits)
        self.on_fatal: Callable[[str], None] = lambda reason: None  # the CLI makes the process exit non-zero
        self.draining = False
        self.active_requests = 0  # admitted and not finished (HTTP side), for admission control
        self._in_flight: dict[str, int] = {}  # the same per adapter ("" = base model)
        self._admit_lock = threading.Lock()
        self.served_model_name = config.model.served_model_name or "loraplex-base"
        # Known once the model loaded: request defaults from its generation config (--generation-config), and
        # the context length served (--max-model-len, else the model's own; capped by the KV pool).
        self.sampling_defaults: dict[str, float] = {}
        self.max_model_len = config.engine.max_model_len

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
        if self.tenants is not None:
            self.tenants.start()

    def _load(self) -> None:
        cfg = self.config
        self.loaded = load_model(cfg.model)
        if cfg.model.served_model_name is None:
            self.served_model_name = DEMO_MODEL_NAME if cfg.model.path is None else self.loaded.model_dir.name
        self.sampling_defaults = sampling_defaults(cfg.model.generation_config, self.loaded.model_dir)
        engine = LLMEngine(self.loaded, self._engine_config(),
                           adapter_loader=lambda name: self.store.load_weights(name))
        self.store = AdapterStore(
            StoreConfig(cfg.server.state_dir, cfg.server.adapter_root, cfg.engine.lora.max_lora_rank,
                        cfg.server.max_upload_bytes, cfg.server.s3_endpoint, cfg.server.registry,
                        history=cfg.server.adapter_history, s3_timeout_s=cfg.server.s3_timeout_s),
            engine.lora.module_shapes(), cfg.engine.lora.max_loras)
        self.store.attach(engine.adapter_port)
        self.store.on_removed = self.adapter_removed
        self.store.on_dropped = self.versions_dropped
        if cfg.server.resolver is not None:
            self.resolver = AdapterResolver(cfg.server.resolver, self.store.register_path, cfg.server.adapter_root)
        engine.adapters.on_load_seconds = lambda seconds: self._adapter_loaded(engine.adapters, seconds)
        self._preload()
        async_engine = AsyncEngine(engine)
        self._cap_context(engine.config.max_model_len, async_engine.token_capacity)
        async_engine.on_step = self.metrics.observe_step
        async_engine.on_fatal = self.fatal
        async_engine.start()
        self.engine = async_engine
        if self.store.registry.shared:
            self.poller = RegistryPoller(self.store.sync, cfg.server.registry_poll_s)
            self.poller.start()

    def _engine_config(self) -> EngineConfig:
        """The engine's config, with the model's own context length when --max-model-len was not given."""
        cfg = self.config
        declared = declared_context_len(self.loaded)
        if cfg.model.max_model_len is not None:
            if declared is not None and cfg.model.max_model_len > declared:
                log.warning("--max-model-len %d exceeds the %d positions the model declares "
                            "(max_position_embeddings): outputs past it may degrade", cfg.model.max_model_len, declared)
            return cfg.engine
        if declared is None:
            log.info("max_model_len %d: the model declares no max_position_embeddings", cfg.engine.max_model_len)
            return cfg.engine
        return dataclasses.replace(cfg.engine, max_model_len=declared)

    def _cap_context(self, wanted: int, capacity: int) -> None:
        """The context served is what the KV pool can hold of `wanted`; say which bound chose it."""
        self.max_model_len = min(wanted, capacity)
        source = "--max-model-len" if self.config.model.max_model_len is not None else "the model's own"
        if capacity < wanted:
            log.warning("max_model_len %d (%s) capped to %d: the KV pool holds %d tokens (raise --num-kv-blocks, "
                        "or lower --max-num-seqs for a larger share per sequence)", wanted, source, capacity, capacity)
        else:
            log.info("max_model_len %d (%s)", wanted, source)

    def _adapter_loaded(self, table: SlotTable, seconds: float) -> None:
        """An adapter reached a device slot after `seconds` (engine thread). A ties / dare merge's virtual adapter
        (computed from its components on its first use) is logged and timed apart from plain loads."""
        merged = [name for name in table.resident()["device"]
                  if is_virtual(name) and table.load_info(name).get("last_load_seconds") == seconds]
        if merged:
            log.info("merge %s computed and loaded in %.1fs (once: later requests for it reuse the slot)",
                     merged[0], seconds)
        self.metrics.observe_adapter_load(seconds, merge=bool(merged))

    def adapter_removed(self, name: str) -> None:
        """`name` was unregistered (here or, with a shared registry, by another replica): its metric children go
        too (bounded memory); its requests that end from now on count as "unknown"."""
        self.metrics.forget_adapter(name)

    def versions_dropped(self, keys: Sequence[str], reason: str) -> None:
        """Adapter versions (engine keys) left the registry: the name was unregistered, or a version left its
        history. Running requests finish on the device copy (the engine frees the slot on their last release);
        queued ones have not started and would otherwise wait for weights that are gone."""
        if self.engine is not None:
            for key in keys:
                self.engine.fail_adapter(key, reason)

    def _preload(self) -> None:
        self._preload_demo()
        for name, path in self.config.server.preload:
            if name in self.store:
                log.info("preload %s: already registered (kept from --state-dir)", name)
                continue
            try:
                self.store.register_path(name, path)
            except AdapterConflictError:  # another replica of a shared registry preloaded it first
                if not self.store.registry.shared:
                    raise
                log.info("preload %s: already registered in the shared registry by another replica", name)
                self.store.sync()

    def _preload_demo(self) -> None:
        """The demo's adapters, registered from their own folder as copies (as an upload would be): the folder
        is ours, so --adapter-root's confinement (for user paths) does not apply to it."""
        root = self.config.server.demo_adapters
        if root is None:
            return
        for name in DEMO_ADAPTERS:
            replace = name in self.store  # kept from --state-dir (or another replica registered it)
            if replace and self.store.get(name).current.sha256 == dir_digest(root / name):
                continue
            if replace:  # the shipped files changed since that registration (a rebuilt demo): ship them
                log.info("demo adapter %s: its files changed; registering them as its new current version", name)
            files = {f: (root / name / f).read_bytes() for f in ADAPTER_FILES}
            try:
                self.store.register_upload(name, files, replace=replace)
            except AdapterConflictError:  # another replica of a shared registry preloaded it first
                self.store.sync()
        log.info("demo adapters from %s: %s", root, ", ".join(DEMO_ADAPTERS))

    def _tenants_changed(self, old: TenantTable, new: TenantTable) -> None:
        """A reload: forget what removed tenants left (bounded memory and label sets); requests in flight finish."""
        keep = (*new.names(), OPERATOR)
        self.quotas.keep_only(keep)
        self.usage.keep_only(keep)

    def tenant_names(self) -> list[str]:
        """Every tenant metering may hold: the file's and the operator, or "default" without a file."""
        return [*self.tenants.table.names(), OPERATOR] if self.tenants is not None else [DEFAULT]

    def queue_depths(self) -> dict[str, int]:
        """Requests each tenant has waiting in the engine (the snapshot the engine thread published last)."""
        if self.engine is None:
            return {}
        snap = self.engine.snapshot
        return dict(snap.waiting_tenants) if self.tenants is not None else {DEFAULT: snap.waiting}

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="loraplex-load", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self.tenants is not None:
            self.tenants.stop()
        if self.poller is not None:
            self.poller.stop()
        if self.engine is not None:
            self.engine.stop()

    # ---- admission -------------------------------------------------------------------------------
    def try_admit(self, adapter: str | None, weight: int = 1, tenant: str | None = None) -> str | None:
        """Count `weight` more in-flight sequences for `adapter` (None: the base model), or for `tenant` when given
        (--tenants: a customer's share, whatever adapters it uses), all or none; None when admitted, else why not
        (-> 429). One adapter (tenant) may hold at most `adapter_queue_limit` of the --max-queue slots, so a
        tenant flooding the server cannot lock the others out at the door."""
        limit = self.config.server.max_queue
        per_adapter = adapter_queue_limit(limit)
        holder = _holder(adapter, tenant)
        with self._admit_lock:
            if self.active_requests + weight > limit:
                return f"the server is at capacity ({self.active_requests} requests in flight, --max-queue {limit})"
            if self._in_flight.get(holder, 0) + weight > per_adapter:
                who, kind = ((f"tenant {tenant!r}", "tenant") if tenant is not None else
                             ("adapter " + repr(adapter) if adapter else "the base model", "adapter"))
                return (f"{who} has {self._in_flight.get(holder, 0)} requests in flight and this one needs {weight} "
                        f"more; one {kind} may hold {per_adapter} of --max-queue {limit} (the rest is kept for other "
                        f"{kind}s)")
            self.active_requests += weight
            self._in_flight[holder] = self._in_flight.get(holder, 0) + weight
            return None

    def release(self, adapter: str | None, tenant: str | None = None) -> None:
        tenant = _holder(adapter, tenant)
        with self._admit_lock:
            self.active_requests -= 1
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]  # bounded by the adapters with requests in flight


def _holder(adapter: str | None, tenant: str | None) -> str:
    """Whose share of --max-queue a sequence counts against: its tenant's (--tenants), else its adapter's."""
    return "tenant:" + tenant if tenant is not None else adapter or ""


def _reserved_digests(server: ServerConfig) -> tuple[bytes, ...]:
    """Key digests no tenant may have: the operator's."""
    return (key_digest(server.admin_key),) if server.admin_key else ()


def declared_context_len(loaded: LoadedModel) -> int | None:
    """The context length the model's config declares (max_position_embeddings), if any."""
    value = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value >= 2 else None


def adapter_queue_limit(max_queue: int) -> int:
    """In-flight requests one adapter may hold: all of a small queue, three quarters of a larger one."""
    return max_queue if max_queue < 4 else max_queue - max_queue // 4
