"""`best_of` on /v1/completions: generate `best_of` candidates per prompt, return the `n` most
likely.

The candidates are the choices an `n = best_of` request would make (candidate k of a prompt
sampled with `seed + k`), each asking the engine for its tokens' logprobs; the `n` with the
highest cumulative logprob (the sum of their tokens' log-probabilities under the model, as
the engine reports them: before temperature, filters, penalties and bias) are returned, best
first, indexed as `n` choices are. Usage counts every candidate's tokens, since all of them
were generated (as OpenAI bills them). Streaming is refused (`CompletionRequest`): the best
are known only at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llm_gateway.responses import Choice, CompletionFormat, Generation
from llm_gateway.schemas import CompletionRequest


def plan(body: CompletionRequest) -> tuple[CompletionRequest, CompletionFormat]:
    """The request to run and the format of its answer: `body` itself unless it asks for
    more candidates than choices."""
    answer = CompletionFormat(body.echo, body.logprobs)
    n = body.n or 1
    if body.best_of is None or body.best_of <= n or body.stream:
        return body, answer  # (a stream with best_of is refused by check_supported)
    # Logprobs of every candidate (0 alternatives unless the caller asked for some); the
    # answer shows them only if the caller asked.
    logprobs = body.logprobs if body.logprobs is not None else 0
    candidates = body.model_copy(update={"n": body.best_of, "logprobs": logprobs})
    return candidates, BestOf(answer, n)


def cumulative_logprob(choice: Choice) -> float:
    return sum(lp.logprob for lp in choice.logprobs)


class BestOf(CompletionFormat):
    """A whole completion of the `n` best candidates of each prompt."""

    def __init__(self, answer: CompletionFormat, n: int) -> None:
        super().__init__(answer.echo, answer.logprobs)
        self.n = n

    def best(self, g: Generation) -> list[Choice]:
        by_prompt: dict[int, list[Choice]] = {}
        for c in g.choices:
            by_prompt.setdefault(c.prompt_index, []).append(c)
        best = []
        for p, candidates in sorted(by_prompt.items()):
            ranked = sorted(candidates, key=cumulative_logprob, reverse=True)  # stable
            best += [dataclasses.replace(c, index=p * self.n + k) for k, c in enumerate(ranked[: self.n])]  # fmt: skip
        return best

    def whole(self, g: Generation) -> dict[str, Any]:
        answer = super().whole(dataclasses.replace(g, choices=self.best(g)))
        answer["usage"] = g.usage()  # every candidate was generated
        return answer
