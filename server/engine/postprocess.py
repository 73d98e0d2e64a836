"""After sampling: append the token, stream its text, decide whether the request is finished and why."""

from __future__ import annotations

import dataclasses

from loraplex.server.engine.request import Request, RequestOutput


class Postprocessor:
    def __init__(self, eos_ids: tuple[int, ...], max_model_len: int) -> None:
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def append(self, req: Request, token: int, logprob: float | None = None,
               top: tuple[tuple[int, float], ...] | None = None) -> RequestOutput:
        req.output_ids.append(token)
        reason = self._finish_reason(req, token)
        text, stopped = req.stop_matcher.feed(req.detokenizer.push([token]))
        if stopped:
            reason = "stop"
        elif reason is not None:
            text += self._drain(req)
        req.finish_reason = reason
        out = self._output(req, [token], text, reason)
        if logprob is None:
            return out
        wants_top = bool(req.params.logprobs)
        return dataclasses.replace(out, logprobs=[logprob], top_logprobs=[top or ()] if wants_top else None)

    def final(self, req: Request, reason: str, error: str | None = None,
              error_kind: str | None = None) -> RequestOutput:
        """The terminal output of a request ended outside the normal flow (abort, error)."""
        req.finish_reason = reason
        return dataclasses.replace(self._output(req, [], "", reason, error), error_kind=error_kind)

    def _finish_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        n = len(req.output_ids)
        if req.guided is not None and req.guided.terminated:  # the grammar is complete: nothing may follow
            return "stop"
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)):
            return "stop"
        if n >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _drain(req: Request) -> str:
        """Release text held back by the detokenizer and the stop matcher at the end of a request."""
        text, stopped = req.stop_matcher.feed(req.detokenizer.flush())
        return text if stopped else text + req.stop_matcher.flush()

    @staticmethod
    def _output(req: Request, tokens: list[int], text: str, reason: str | None,
                error: str | None = None) -> RequestOutput:
        return RequestOutput(req.request_id, tokens, text, reason is not None, reason,
                             len(req.prompt_ids), len(req.output_ids), error, num_cached_tokens=req.num_cached_tokens)
