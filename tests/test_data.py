"""Data loaders: JSONL (errors name file:line), datasets column mapping, the HH-RLHF parser."""

from __future__ import annotations

import json

import pytest

from grao_fast.train.data import Example, PromptSampler, load_hf, load_jsonl, parse_hh

HH_MULTI = (
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Whiskers?"
    "\n\nHuman: Something shorter.\n\nAssistant: How about Tom?"
)


def test_parse_hh_multi_turn_keeps_history_and_takes_last_answer():
    ex = parse_hh(HH_MULTI)
    assert ex.reference == "How about Tom?"
    assert ex.prompt.startswith("Human: What is a good name for a cat?")
    assert ex.prompt.endswith("Human: Something shorter.\n\nAssistant:")
    assert "Maybe Whiskers?" in ex.prompt


def test_parse_hh_single_turn():
    ex = parse_hh("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?")
    assert ex == Example(prompt="Human: Hi there\n\nAssistant:", reference="Hello! How can I help?")


@pytest.mark.parametrize(
    "text, message",
    [
        ("just some text", "not an HH-RLHF dialogue"),
        ("\n\nAssistant: an answer without a question", "not an HH-RLHF dialogue"),
        ("\n\nHuman: a question\n\nAssistant:   ", "last assistant turn is empty"),
    ],
)
def test_parse_hh_rejects_malformed_dialogues(text, message):
    with pytest.raises(ValueError, match=message):
        parse_hh(text)


def test_parse_hh_rejects_non_string():
    with pytest.raises(TypeError, match="chosen"):
        parse_hh(None)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_jsonl_plain_and_blank_lines(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "p1", "reference": "r1"}),
            "",
            json.dumps({"prompt": "p2", "reference": "r2", "extra": 1}),
        ],
    )
    assert load_jsonl(path) == [Example("p1", "r1"), Example("p2", "r2")]


def test_load_jsonl_column_mapping_and_hh(tmp_path):
    path = _write(tmp_path / "q.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    assert load_jsonl(path, prompt_field="question", reference_field="answer") == [
        Example("q", "a")
    ]
    hh = _write(tmp_path / "hh.jsonl", [json.dumps({"chosen": HH_MULTI, "rejected": "x"})])
    assert load_jsonl(hh, fmt="hh")[0].reference == "How about Tom?"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", '], r"d\.jsonl:2: malformed JSON"),
        (
            ['{"prompt": "a", "reference": "b"}', "", '{"prompt": "a"}'],
            r"d\.jsonl:3: missing field 'reference'",
        ),
        (['{"prompt": 3, "reference": "b"}'], r"d\.jsonl:1: field 'prompt' must be a string"),
        (['["prompt", "reference"]'], r"d\.jsonl:1: expected a JSON object"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_load_jsonl_hh_error_names_line(tmp_path):
    path = _write(
        tmp_path / "hh.jsonl",
        [json.dumps({"chosen": HH_MULTI}), json.dumps({"chosen": "no turns"})],
    )
    with pytest.raises(ValueError, match=r"hh\.jsonl:2: chosen: not an HH-RLHF dialogue"):
        load_jsonl(path, fmt="hh")


def test_load_jsonl_missing_empty_and_bad_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="holds no examples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="data_format"):
        load_jsonl(tmp_path / "x.jsonl", fmt="csv")


def test_load_hf_local_dataset_with_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    _write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    examples = load_hf(
        str(tmp_path), split="train", prompt_field="question", reference_field="answer"
    )
    assert examples == [Example(f"q{i}", f"a{i}") for i in range(3)]
    with pytest.raises(ValueError, match=r"row 0: missing field 'prompt'"):
        load_hf(str(tmp_path), split="train")


def test_prompt_sampler_is_a_pure_function_of_step():
    examples = [Example(str(i), str(i)) for i in range(10)]
    a, b = PromptSampler(examples, 4, seed=1), PromptSampler(examples, 4, seed=1)
    order = [a.batch(s) for s in range(6)]
    assert [b.batch(s) for s in reversed(range(6))] == order[::-1]  # any access order
    first_epoch = [ex for batch in order[:2] for ex in batch] + order[2][:2]
    assert sorted(ex.prompt for ex in first_epoch) == sorted(
        str(i) for i in range(10)
    )  # a permutation
    assert (
        PromptSampler(examples, 4, seed=2).batch(0) != order[0]
        or PromptSampler(examples, 4, seed=2).batch(1) != order[1]
    )
    with pytest.raises(ValueError, match="batch_prompts"):
        PromptSampler(examples, 11, seed=0)


def test_load_hf_missing_dataset_is_one_line_error(tmp_path):
    with pytest.raises(
        ValueError, match=r"data: cannot load dataset '.*no-such' \(split 'train'\)"
    ):
        load_hf(str(tmp_path / "no-such"))
