"""A request reported whole, as the held slots keep it (:mod:`sidecar.ledger.held`).

A span (or a proxied request that had no span) arrives after its request ended, with
its window and its exact tokens; the held slots place it where it ran and hand it out
once every slot it ran in has given it its share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.ledger.requests import (
    INF,
    FinishedRequest,
    Request,
    Status,
    cached_part,
    computed_prompt,
)

if TYPE_CHECKING:
    from sidecar.ledger.pieces import Books


@dataclass(slots=True)
class HeldRequest:
    """A request reported whole (a span, or a proxied request that had no span)."""

    req: Request
    """Its window and token work, as the sharing rule reads them."""
    heard_from_s: float
    heard_to_s: float
    """Where a count may have seen it: its window, widened to the proxy's view of it
    where joined (the proxy counts it queued, and until its last byte)."""
    open_slots: int = 0
    waiting_slots: bool = False
    """Part of its window lies past the newest slot: samples for it are still due."""
    missed_s: float = 0.0
    """Seconds of its window no held slot covered any more (it came after the hold)."""
    reported: tuple[int | None, int | None] = (None, None)
    """Its prompt and completion tokens as reported (cached prompt tokens included)."""

    @classmethod
    def whole(
        cls,
        request_id: str,
        model: str,
        *,
        start_s: float,
        first_token_s: float,
        end_s: float,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        endpoint: str = "unknown",
        status: Status = "ok",
        heard_s: tuple[float, float] | None = None,
    ) -> HeldRequest:
        """A request reported whole; cached prompt tokens do (almost) no prefill work."""
        end = max(end_s, start_s)
        first = min(max(first_token_s, start_s), end)
        prompt = computed_prompt(prompt_tokens, cached_tokens) or 0
        req = span_request(
            request_id, model, start_s=start_s, first_token_s=first, end_s=end,
            prompt_work=float(prompt), completion_tokens=float(completion_tokens or 0),
            endpoint=endpoint,
        )  # fmt: skip
        req.status = status
        cached = cached_part(prompt_tokens, cached_tokens)
        if cached is not None:
            # all of the prompt is in the KV cache (its context), its computed part is work
            req.prompt_tokens = prompt_tokens
            req.cached_tokens = cached
        lo, hi = (start_s, end) if heard_s is None else heard_s
        return cls(req, min(lo, start_s), max(hi, end), reported=(prompt_tokens, completion_tokens))

    def finished(self) -> FinishedRequest:
        """What the ledger hands out once every slot it ran in has settled."""
        r = self.req
        return FinishedRequest(
            id=r.id,
            model=r.model,
            endpoint=r.endpoint,
            status=r.status,
            start_s=r.start_s,
            end_s=r.end_s,
            first_token_s=r.first_token_s,
            prompt_tokens=self.reported[0],
            completion_tokens=self.reported[1],
            dynamic_j=r.dynamic_j,
            idle_j=r.idle_j,
            prefill_j=min(max(r.prefill_j, 0.0), r.dynamic_j + r.idle_j),
            missed_s=self.missed_s,
            cached_tokens=r.cached_tokens,
        )


def span_request(
    request_id: str,
    model: str,
    *,
    start_s: float,
    first_token_s: float,
    end_s: float,
    prompt_work: float,
    completion_tokens: float,
    endpoint: str,
) -> Request:
    """A request known whole, as the live path would have built it: its prompt from
    its start to its first token, its output known as a total from there to its end."""
    req = Request(request_id, model, endpoint, start_s, prompt_work or None, known_s=INF)
    req.first_token_s = first_token_s
    req.end_s = end_s
    req.prompt_tokens = round(prompt_work)
    req.completion_tokens = round(completion_tokens)
    if prompt_work > 0:
        req.segments.append((start_s, first_token_s, prompt_work, 0.0))
    if completion_tokens > 0:
        req.segments.append((first_token_s, end_s, 0.0, completion_tokens))
    return req


def weighs(books: Books, r: Request, t0: float, t1: float, running: int) -> tuple[float, float]:
    """Its prompt's and its output's weight in [t0, t1] relative to a stand-in that
    decodes all through it at the request's own pace, by the ledger's fitted costs
    (the step model's where it is in force, else the prompt-to-output ratio)."""
    first = r.end_s if r.first_token_s is None else r.first_token_s
    span = t1 - t0
    dec_s = max(0.0, min(r.end_s, t1) - max(first, t0))
    pre_s = max(0.0, min(first, t1) - max(r.start_s, t0))
    if pre_s <= 0.0:
        return 0.0, dec_s / span
    prompt = (r.prompt_work or 0.0) * (pre_s / (first - r.start_s) if first > r.start_s else 1.0)
    pace = (r.completion_tokens or 0) / (r.end_s - first) if r.end_s > first else 0.0
    tokens = max(pace, 1.0) * span  # what the stand-in decodes here
    coef = books.step_model.coef
    if coef is not None:
        a, b, c, f = coef
        context = (r.prompt_tokens or 0) + (r.completion_tokens or 0) / 2.0
        per_token = b + c * context / 1000.0 + f / max(1, running)
        prompt_w = a * prompt / (per_token * tokens) if per_token > 0 else 0.0
    else:
        prompt_w = books.prefill_fit.ratio * prompt / tokens
    return prompt_w, dec_s / span


def stand_in(k: int, i: int, t0: float, t1: float, *, attributable: bool = False) -> Request:
    """A request a count saw in [t0, t1] that did not report: it weighs as the mean.
    ``attributable``: a stand-in that keeps its share for a span still to come (on no
    model's totals), else its share is unattributed."""
    req = Request(f"absent:{k}:{i}", "", "unknown", t0, None, end_s=t1, known_s=INF)
    req.attributable = attributable
    req.booked = not attributable
    return req
