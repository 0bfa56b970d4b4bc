"""Token-level controls through real gateway + engine processes, with the official `openai`
client where it applies: `logit_bias` bans and forces tokens (greedy and sampled), `best_of`
returns the most likely of its candidates, `suffix` is refused with a reason, and vLLM's
/tokenize and /detokenize answer as the engine's tokenizer does."""

from __future__ import annotations

import httpx
import openai
import pytest
from tests.e2e.e2e_services import Service

from llm.checkpoint import LoadedModel

PROMPT = "The "
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_bans_and_forces_tokens(
    client: openai.OpenAI, reference: LoadedModel, temperature: float
) -> None:
    tok = reference.tokenizer  # characters: a token per character
    kwargs = dict(model=reference.name, prompt=PROMPT, max_tokens=12, temperature=temperature,
                  seed=3, extra_body={"ignore_eos": True})  # fmt: skip
    free = client.completions.create(**kwargs).choices[0].text
    common = max(set(free), key=free.count)
    banned = client.completions.create(**kwargs, logit_bias={str(tok.encode(common)[0]): -100})
    assert common not in banned.choices[0].text and len(banned.choices[0].text) == 12
    assert "Z" not in free
    forced = client.completions.create(**kwargs, logit_bias={str(tok.encode("Z")[0]): 100})
    assert forced.choices[0].text == "Z" * 12
    chat = client.chat.completions.create(
        model=reference.name, messages=MESSAGES, max_tokens=4, temperature=temperature,
        logit_bias={str(tok.encode("Z")[0]): 100},
    )  # fmt: skip
    assert chat.choices[0].message.content == "ZZZZ"
    assert client.completions.create(**kwargs).choices[0].text == free  # nothing lingers


def test_logit_bias_outside_the_vocabulary_is_a_bad_request(
    client: openai.OpenAI, reference: LoadedModel
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=reference.name, prompt=PROMPT, max_tokens=2, logit_bias={"100000": 5}
        )
    assert e.value.body["param"] == "logit_bias"
    assert "100000" in e.value.body["message"]


def test_best_of_returns_the_most_likely_candidates(
    client: openai.OpenAI, reference: LoadedModel
) -> None:
    kwargs = dict(model=reference.name, prompt=PROMPT, max_tokens=8, temperature=1.0)
    # Candidate k is what a lone request seeded 20 + k generates.
    alone = [client.completions.create(**kwargs, seed=20 + k, logprobs=0) for k in range(4)]
    scores = [sum(a.choices[0].logprobs.token_logprobs) for a in alone]
    assert len(set(scores)) == 4
    best = sorted(range(4), key=lambda k: scores[k], reverse=True)[:2]

    reply = client.completions.create(**kwargs, seed=20, n=2, best_of=4)
    assert [c.text for c in reply.choices] == [alone[k].choices[0].text for k in best]
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.logprobs is None for c in reply.choices)  # not asked for
    # Usage counts every candidate (all were generated) and the prompt once.
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens

    scored = client.completions.create(**kwargs, seed=20, best_of=4, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == alone[best[0]].choices[0].text
    assert sum(choice.logprobs.token_logprobs) == pytest.approx(scores[best[0]])
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"best_of": 2, "stream": True}, "best_of", "streamed"),
        ({"best_of": 2, "n": 3}, "best_of", "at least n"),
        ({"suffix": " and so on"}, "suffix", "fill-in-the-middle"),
    ],
)
def test_best_of_and_suffix_refusals_say_why(
    client: openai.OpenAI, reference: LoadedModel, kwargs: dict, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=reference.name, prompt=PROMPT, max_tokens=2, **kwargs)
    assert e.value.body["param"] == param
    assert words in e.value.body["message"]


def test_tokenize_and_detokenize_answer_as_the_engine_tokenizer(
    client: openai.OpenAI, gateway: Service, reference: LoadedModel
) -> None:
    base, tok = f"http://127.0.0.1:{gateway.port}", reference.tokenizer

    def post(path: str, body: dict, status: int = 200) -> dict:
        response = httpx.post(base + path, json=body, timeout=30)
        assert response.status_code == status, response.text
        return response.json()

    text = "def f(x):\n    return x"
    ids = tok.encode(text)
    context = reference.config.max_seq_len
    got = post("/tokenize", {"model": reference.name, "prompt": text, "add_special_tokens": True})
    assert got == {"count": len(ids), "max_model_len": context, "tokens": ids}
    assert post("/detokenize", {"model": reference.name, "tokens": ids}) == {"prompt": text}
    assert post("/detokenize", {"tokens": [*ids, tok.eos_id]})["prompt"] != text  # specials show

    chat = post("/tokenize", {"messages": MESSAGES})  # `model` is optional, as in vLLM
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))  # fmt: skip
    reply = client.chat.completions.create(model=reference.name, messages=MESSAGES, max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]
    closed = post("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert closed["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=False))  # fmt: skip

    for path, body, status, param in [
        ("/tokenize", {"model": "gpt-4o", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"model": "gpt-4o", "tokens": [1]}, 404, "model"),
    ]:
        assert post(path, body, status)["error"]["param"] == param, (path, body)
