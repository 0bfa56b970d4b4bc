"""The official `openai` client (sync and async, streaming and not) against real gateway +
engine processes: `n` choices and seeds, logprobs consistent with the text, echo that
scores a prompt as the reference model does, vLLM's sampling and stopping extras (as
benchmark clients send them), exact usage."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import openai
import pytest
import torch
from tests.e2e.e2e_services import Service

from llm.checkpoint import LoadedModel
from llm.inference import SamplingParams, generate

PROMPT = "The "


def async_client(gateway: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="x", max_retries=0, timeout=30
    )


def prompt_logprobs(ref: LoadedModel, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from an in-process forward of the reference."""
    ref.model.clear_cache()
    with torch.no_grad():
        logprobs = torch.log_softmax(ref.model(torch.tensor([ids]))[0, :-1].float(), dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(ids[1:])]


def test_n_choices_are_seeded_one_by_one(client: openai.OpenAI, reference: LoadedModel) -> None:
    kwargs = dict(model=reference.name, prompt=PROMPT, max_tokens=8, temperature=1.0)
    reply = client.completions.create(**kwargs, n=3, seed=11)
    texts = [c.text for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # seeds 11, 12, 13 sample differently
    again = client.completions.create(**kwargs, n=3, seed=11)
    assert [c.text for c in again.choices] == texts
    # Choice k is what a lone request seeded 11 + k gives.
    assert client.completions.create(**kwargs, seed=12).choices[0].text == texts[1]
    prompt_tokens = len(reference.tokenizer.encode(PROMPT))
    completion_tokens = reply.usage.completion_tokens
    assert completion_tokens == sum(
        client.completions.create(**kwargs, seed=11 + k).usage.completion_tokens for k in range(3)
    )
    assert reply.usage.prompt_tokens == prompt_tokens  # once, not per choice
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens


def test_streamed_n_chat_equals_the_whole_one(client: openai.OpenAI, gateway: Service) -> None:
    model = client.models.list().data[0].id
    kwargs = dict(model=model, messages=[{"role": "user", "content": "What is a list?"}],
                  max_tokens=12, temperature=1.0, seed=5, n=2)  # fmt: skip
    whole = client.chat.completions.create(**kwargs)

    async def streamed() -> tuple[dict[int, str], dict[int, str], openai.types.CompletionUsage]:
        async with async_client(gateway) as aclient:
            stream = await aclient.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            texts: dict[int, str] = defaultdict(str)
            finish: dict[int, str] = {}
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    if choice.finish_reason:
                        finish[choice.index] = choice.finish_reason
            assert usage is not None
            return texts, finish, usage

    texts, finish, usage = asyncio.run(streamed())
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()


@pytest.mark.parametrize("stream", [False, True])
def test_chat_top_logprobs_spell_the_text(
    client: openai.OpenAI, reference: LoadedModel, stream: bool
) -> None:
    kwargs = dict(model=reference.name, messages=[{"role": "user", "content": "hi"}],
                  max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    if stream:
        tokens, text = [], ""
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                tokens += choice.logprobs.content if choice.logprobs else []
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        tokens, text = choice.logprobs.content, choice.message.content
    assert len(tokens) == 10
    assert "".join(t.token for t in tokens) == text
    for t in tokens:
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        # Greedy: the chosen token is the most likely one.
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)
        assert t.bytes == list(t.token.encode())


def test_completion_logprobs_in_the_legacy_format(
    client: openai.OpenAI, reference: LoadedModel
) -> None:
    choice = client.completions.create(
        model=reference.name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    ).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and top[token] == logprob  # the top 2 and the chosen one
        assert max(top.values()) == logprob  # greedy

    # The same logprobs as the reference scores the generated text with.
    ids = reference.tokenizer.encode(PROMPT + choice.text)
    want = prompt_logprobs(reference, ids)[-len(lp.tokens) :]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-3)


def test_echo_scores_prompts_like_the_reference(
    client: openai.OpenAI, reference: LoadedModel
) -> None:
    """lm-eval-harness's loglikelihood: token-id prompts, echo, logprobs, max_tokens=0."""
    tok = reference.tokenizer
    texts = ["def f(x):\n    return x", "The cat", "a"]
    prompts = [tok.encode(t) for t in texts]
    reply = client.completions.create(
        model=reference.name, prompt=prompts, echo=True, logprobs=1, max_tokens=0
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice, text, ids in zip(reply.choices, texts, prompts, strict=True):
        lp = choice.logprobs
        assert choice.text == text and "".join(lp.tokens) == text
        assert choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI
        assert lp.token_logprobs[1:] == pytest.approx(prompt_logprobs(reference, ids), abs=1e-4)
    total = sum(len(ids) for ids in prompts)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (total, 0, total)

    # A text prompt scores the same.
    text = client.completions.create(
        model=reference.name, prompt=texts[0], echo=True, logprobs=1, max_tokens=0
    ).choices[0]
    assert text.logprobs.token_logprobs == reply.choices[0].logprobs.token_logprobs
    assert text.logprobs.tokens == reply.choices[0].logprobs.tokens


def test_streamed_echo_with_generation(client: openai.OpenAI, gateway: Service) -> None:
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt=PROMPT, echo=True, logprobs=1, max_tokens=5, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]

    async def streamed() -> tuple[str, list[str], list[int]]:
        async with async_client(gateway) as aclient:
            text, tokens, offsets = "", [], []
            async for chunk in await aclient.completions.create(**kwargs, stream=True):
                for choice in chunk.choices:
                    text += choice.text
                    if choice.logprobs:
                        tokens += choice.logprobs.tokens
                        offsets += choice.logprobs.text_offset
            return text, tokens, offsets

    text, tokens, offsets = asyncio.run(streamed())
    assert whole.text.startswith(PROMPT) and len(whole.text) > len(PROMPT)
    assert (text, tokens, offsets) == (
        whole.text,
        whole.logprobs.tokens,
        whole.logprobs.text_offset,
    )
    assert "".join(tokens) == text


def test_sampling_extras_pass_through(client: openai.OpenAI, reference: LoadedModel) -> None:
    kwargs = dict(model=reference.name, prompt=PROMPT, max_tokens=10)
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # each keeps only the most likely token
        sampled = client.completions.create(**kwargs, temperature=1.0, seed=3, extra_body=extra)
        assert sampled.choices[0].text == greedy, extra
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs, extra_body={"repetition_penalty": -1})
    assert e.value.body["param"] == "repetition_penalty"


def test_stopping_extras_pass_through(client: openai.OpenAI, reference: LoadedModel) -> None:
    """vLLM's `stop_token_ids`, `include_stop_str_in_output`, `min_tokens`, `ignore_eos` and
    `skip_special_tokens`, via `extra_body`, against the reference's own tokens."""
    tok = reference.tokenizer
    kwargs = dict(model=reference.name, prompt=PROMPT, max_tokens=24, temperature=0)
    ids = generate(reference.model, tok.encode(PROMPT), max_new_tokens=24,
                   sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
    text = tok.decode(ids)
    stop_id = ids[3]  # stops at its first occurrence
    first = ids.index(stop_id)

    def create(**extra: object) -> openai.types.Completion:
        return client.completions.create(**kwargs, extra_body=extra)

    stopped = create(stop_token_ids=[stop_id])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (
        tok.decode(ids[:first]), "stop",
    )  # fmt: skip
    assert stopped.usage.completion_tokens == first + 1  # the stop token counts
    assert create(stop_token_ids=[stop_id], include_stop_str_in_output=True).choices[
        0
    ].text == tok.decode(ids[: first + 1])
    stop = text[5:8]
    assert (
        create(stop=stop, include_stop_str_in_output=True).choices[0].text
        == text[: text.index(stop) + len(stop)]
    )

    # min_tokens: the stop token is not sampled before it (the greedy choice without it).
    never_first = ids[0]
    late = create(stop_token_ids=[never_first], min_tokens=2).choices[0]
    ref = reference.model
    ref.clear_cache()
    with torch.no_grad():
        logits = ref(torch.tensor([tok.encode(PROMPT)]))[0, -1].float()
    logits[never_first] = float("-inf")
    assert late.text[0] == tok.decode([int(logits.argmax())])
    assert tok.decode([never_first]) not in late.text[:2]
    with pytest.raises(openai.BadRequestError) as e:
        create(min_tokens=30)  # more than max_tokens
    assert e.value.body["param"] == "min_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        create(stop_token_ids=[tok.vocab_size])
    assert e.value.body["param"] == "stop_token_ids"


def test_eos_extras_pass_through(client: openai.OpenAI, reference: LoadedModel) -> None:
    """A sampled generation that reaches EOS: it stops there unless `ignore_eos`; the EOS
    shows only with `skip_special_tokens` off and `include_stop_str_in_output`."""
    tok = reference.tokenizer
    prompt_ids = tok.encode(PROMPT)
    hot = dict(temperature=2.0, max_tokens=48)
    for seed in range(64):  # a seed whose sample reaches EOS (the reference finds it)
        ids = generate(reference.model, prompt_ids, max_new_tokens=48,
                       sampling=SamplingParams(2.0, seed=seed), stop_token_ids=())  # fmt: skip
        if tok.eos_id in ids[:-1]:
            break
    else:
        pytest.fail("no seed in 64 samples EOS at temperature 2")
    at = ids.index(tok.eos_id)

    def create(**extra: object) -> openai.types.CompletionChoice:
        reply = client.completions.create(
            model=reference.name, prompt=PROMPT, seed=seed, **hot, extra_body=extra
        )
        return reply.choices[0]

    eos = tok.decode([tok.eos_id], skip_special_tokens=False)
    plain = create()
    assert (plain.text, plain.finish_reason) == (tok.decode(ids[:at]), "stop")
    assert create(include_stop_str_in_output=True).text == tok.decode(ids[:at])  # skipped
    shown = create(include_stop_str_in_output=True, skip_special_tokens=False)
    assert shown.text == tok.decode(ids[:at], skip_special_tokens=False) + eos
    ignored = create(ignore_eos=True)
    assert (ignored.text, ignored.finish_reason) == (tok.decode(ids), "length")
    raw = create(ignore_eos=True, skip_special_tokens=False).text
    assert raw == tok.decode(ids, skip_special_tokens=False) and eos in raw
