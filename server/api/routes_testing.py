"""Test-only hooks, mounted only when the environment sets LORAPLEX_TEST_HOOKS=1 (never in production).

They let a test put the engine into a state by construction instead of by timing: hold it after a given
number of steps (a request is then "still running" however fast the machine is), crash its thread, or make
its next step's forward pass raise.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from loraplex.server.api.generation import check_loaded, runtime_of

ENV_FLAG = "LORAPLEX_TEST_HOOKS"
router = APIRouter(prefix="/_test", include_in_schema=False)


def enabled() -> bool:
    return os.environ.get(ENV_FLAG) == "1"


class StepAllowance(BaseModel):
    steps: int | None  # None: run freely; n >= 0: run n more steps, then hold


@router.post("/engine/steps")
async def allow_steps(body: StepAllowance, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    engine.allow_steps(body.steps)
    return {"steps": body.steps}


@router.get("/engine")
async def engine_state(request: Request) -> dict[str, Any]:
    snap = _engine(request).snapshot
    return {"waiting": snap.waiting, "running": snap.running, "steps": snap.steps}


@router.post("/engine/crash")
async def crash(request: Request) -> dict[str, Any]:
    _engine(request).crash("test hook: engine crash requested")
    return {"crashing": True}


@router.post("/engine/fail_next_step")
async def fail_next_step(request: Request) -> dict[str, Any]:
    """The next forward pass raises (once), as a kernel fault would."""
    _engine(request).fail_next_step("test hook: injected fault in the forward pass")
    return {"armed": True}


def _engine(request: Request) -> Any:
    rt = runtime_of(request)
    check_loaded(rt)
    return rt.engine
