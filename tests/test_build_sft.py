"""build_sft: base / reasoning / location JSON-lines sets, conversations import, errors, licences, resume, S3."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_job
from georeasoner.core import storage
from georeasoner.geo import country_name, to_iso2
from georeasoner.vlm import prompts
from georeasoner.vlm.sft import ROW_FIELDS, BuildSftConfig, find_country, read_sft, run
from georeasoner.world import facts
from georeasoner.world.clues import observation


@pytest.fixture(scope="module")
def manifest(world):
    return storage.read_parquet(str(world / "manifest.parquet")).to_pylist()


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "sft"
    summary = run(BuildSftConfig(input=str(world), output=str(out), seed=3))
    sets = {task: read_sft(str(out / f"{task}.jsonl")) for task in ("base", "reasoning", "location")}
    return out, summary, sets


def test_sets_have_the_right_rows_and_fields(built, manifest):
    out, summary, sets = built
    train = [r for r in manifest if r["split"] == "train"]
    with_clues = [r for r in train if len(r["clues"]) >= 1 and r["country"]]
    assert len(sets["base"]) == len(train) == summary["counts"]["base"]
    assert len(sets["reasoning"]) == len(with_clues) == summary["counts"]["reasoning"]
    assert len(sets["location"]) == len(train) == summary["counts"]["location"]  # location_input defaults to input
    assert summary["skipped"]["split"] == len(manifest) - len(train)
    assert summary["counts"]["errors"] == 0 and (out / "errors.jsonl").read_text() == ""
    by_uri = {r["image_uri"]: r for r in manifest}
    for task, rows in sets.items():
        assert len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            assert tuple(row) == ROW_FIELDS
            src = by_uri[row["image_uri"]]
            assert row["task"] == task and row["source"] == "manifest" and row["split"] == "train"
            assert row["prompt"] == prompts.PROMPTS[task] and row["id"].startswith(f"{task}-")
            assert (row["country"], row["city"], row["geonameid"], row["licence"]) == (
                src["country"], src["city"], src["geonameid"], src["licence"])
            assert row["n_clues"] == len(src["clues"]) and row["image_uri"].startswith("/")
    assert summary["licences"]["base"] == [manifest[0]["licence"]] and summary["non_commercial"] == []


def test_base_answers_describe_the_clues_and_name_no_country(built, manifest):
    by_uri = {r["image_uri"]: r for r in manifest}
    names = {c.name.lower().removeprefix("the ") for c in facts.COUNTRIES}
    names |= {country_name(c.iso2).lower() for c in facts.COUNTRIES}
    assert built[2]["base"]
    for row in built[2]["base"]:
        answer = row["answer"].lower()
        sentences = [observation(c) for c in by_uri[row["image_uri"]]["clues"]] or [prompts.NO_CLUES]
        assert row["answer"] == " ".join(sentences)
        assert not [n for n in names if re.search(rf"\b{re.escape(n)}\b", answer)], row["answer"]


def test_reasoning_answers_are_json_naming_the_country(built, world, manifest):
    by_uri = {r["image_uri"]: r for r in manifest}
    tips = [json.loads(line) for line in (world / "clues.jsonl").read_text().splitlines()]
    texts = {t["text"] for t in tips}
    assert built[2]["reasoning"]
    for row in built[2]["reasoning"]:
        answer = json.loads(row["answer"])
        assert list(answer) == ["reasons", "country"]  # reasons first: the country follows what was seen
        assert answer["country"] == country_name(row["country"]) and to_iso2(answer["country"]) == row["country"]
        assert answer["reasons"] and all(tip in texts for tip in _split_tips(answer["reasons"], texts))
        assert answer["reasons"] == " ".join(observation(c) for c in by_uri[row["image_uri"]]["clues"])


def _split_tips(reasons: str, texts: set[str]) -> list[str]:
    """The tips a reasons string is made of (greedy, tips joined by one space)."""
    found, rest = [], reasons
    while rest:
        tip = next((t for t in sorted(texts, key=len, reverse=True) if rest.startswith(t)), None)
        assert tip is not None, rest
        found.append(tip)
        rest = rest[len(tip):].lstrip(" ")
    return found


def test_tips_per_clue_and_seed(world, tmp_path, built):
    one = run(BuildSftConfig(input=str(world), output=str(tmp_path / "one"), seed=3, reasons="explain", limit=40))
    two = run(BuildSftConfig(input=str(world), output=str(tmp_path / "two"), seed=3, reasons="explain",
                             tips_per_clue=2, limit=40))
    rows = read_sft(str(tmp_path / "two" / "reasoning.jsonl"))
    assert one["counts"]["base"] == two["counts"]["base"] == 40
    first = {r["image_uri"]: r for r in read_sft(str(tmp_path / "one" / "reasoning.jsonl"))}
    for row in rows:  # two tips per clue: more text than one
        assert len(json.loads(row["answer"])["reasons"]) > len(json.loads(first[row["image_uri"]]["answer"])["reasons"])
    run(BuildSftConfig(input=str(world), output=str(tmp_path / "again"), seed=3, reasons="explain", limit=40,
                       overwrite=True))
    again = read_sft(str(tmp_path / "again" / "reasoning.jsonl"))
    assert all(r == first[r["image_uri"]] for r in again)  # limit does not change a row


def test_location_answers_hold_reasons_country_and_city(built, manifest):
    by_uri = {r["image_uri"]: r for r in manifest}
    rows = built[2]["location"]
    assert rows
    for row in rows:
        answer = json.loads(row["answer"])
        reasons = " ".join(observation(c) for c in by_uri[row["image_uri"]]["clues"]) or prompts.NO_CLUES
        assert answer == {"reasons": reasons, "country": country_name(row["country"]), "city": row["city"]}
        assert list(answer) == ["reasons", "country", "city"] and row["prompt"] == prompts.INFERENCE_PROMPT


def test_location_rows_without_clue_annotations_and_reasoning_replay(world, tmp_path, manifest):
    import pyarrow as pa

    plain = [{k: v for k, v in r.items() if k != "clues"} for r in manifest[:40]]  # e.g. real street views
    storage.write_parquet(pa.Table.from_pylist(plain), str(tmp_path / "plain" / "manifest.parquet"))
    summary = run(BuildSftConfig(input=str(world), location_input=str(tmp_path / "plain"), output=str(tmp_path / "o"),
                                 splits=["train", "val", "test"], replay_reasoning=0.1))
    rows = read_sft(str(tmp_path / "o" / "location.jsonl"))
    own = [r for r in rows if r["source"] == "manifest"]
    replayed = [r for r in rows if r["source"] == "replay"]
    assert len(own) == 40 and all(set(json.loads(r["answer"])) == {"country", "city"} for r in own)
    assert replayed and summary["counts"]["location_replayed"] == len(replayed)
    assert all(list(json.loads(r["answer"])) == ["reasons", "country", "city"] for r in replayed)
    assert not {r["image_uri"] for r in replayed} & {r["image_uri"] for r in own}
    assert len({r["id"] for r in rows}) == len(rows)


def test_location_input_errors_and_curated_subset(world, tmp_path, manifest):
    import pyarrow as pa

    sub = manifest[:30]
    sub[1] = {**sub[1], "country": None}
    sub[2] = {**sub[2], "country": "ZZ"}
    storage.write_parquet(pa.Table.from_pylist(sub), str(tmp_path / "curated" / "manifest.parquet"))
    summary = run(BuildSftConfig(input=str(world), location_input=str(tmp_path / "curated"), output=str(tmp_path / "o"),
                                 splits=["train", "val", "test"]))
    rows = read_sft(str(tmp_path / "o" / "location.jsonl"))
    errors = read_sft(str(tmp_path / "o" / "errors.jsonl"))
    assert len(rows) == 28 and {e["key"] for e in errors} == {sub[1]["image_uri"], sub[2]["image_uri"]}
    assert all(e["source"] == "location_input" and e["error"].startswith("no_country: ") for e in errors)
    assert summary["errors_by_kind"] == {"no_country": 2} and summary["counts"]["base"] == len(manifest)


def _conversations(world, manifest) -> list:
    good = next(r for r in manifest if r["country"] == "JP")
    rel = good["image_uri"][len(str(world)) + 1:]
    return [
        {"id": "conv-good", "conversations": [
            {"from": "human", "value": f"Picture 1: <img>{rel}</img>\nWhere is this place and why?"},
            {"from": "gpt", "value": "This is Japan: cars keep left and the signs are in kana."}]},
        {"id": "conv-missing", "conversations": [
            {"from": "user", "value": "Picture 1: <img>images/XX/nowhere/0.jpg</img>\nWhere?"},
            {"from": "assistant", "value": "France."}]},
        {"id": "conv-bad", "conversations": [{"from": "user", "value": "no image here"}]},
    ]


def test_conversations_import(world, tmp_path, manifest):
    conv = tmp_path / "geoguessr_conversations.json"
    conv.write_text(json.dumps(_conversations(world, manifest)))
    summary = run(BuildSftConfig(input=str(world), output=str(tmp_path / "o"), limit=20, conversations=str(conv),
                                 conversations_images=str(world)))
    rows = [r for r in read_sft(str(tmp_path / "o" / "reasoning.jsonl")) if r["source"] == "conversations"]
    errors = read_sft(str(tmp_path / "o" / "errors.jsonl"))
    assert len(rows) == 1 and len(errors) == 2
    row = rows[0]
    assert row["id"] == "conv-good" and row["prompt"] == "Where is this place and why?" and row["country"] == "JP"
    assert row["answer"] == "This is Japan: cars keep left and the signs are in kana."
    assert row["licence"] == "CC-BY-NC-4.0" and row["split"] == "train" and storage.is_file(row["image_uri"])
    assert {e["key"]: e["error"].split(":")[0] for e in errors} == {"conv-missing": "missing_image", "conv-bad": "malformed"}
    assert summary["errors_by_kind"] == {"malformed": 1, "missing_image": 1}
    assert "CC-BY-NC-4.0" in summary["licences"]["reasoning"] and summary["non_commercial"] == ["CC-BY-NC-4.0"]
    assert summary["counts"]["reasoning_from_conversations"] == 1 and summary["counts"]["conversation_records"] == 3


def test_find_country_in_free_text():
    assert find_country("Country: the United States. Reasons: yellow lines.") == "US"
    assert find_country("Somewhere in South America; the plates say Brazil.") == "BR"
    assert find_country("It is in no way clear.") is None


def test_missing_inputs_exit_2_with_one_line(world, tmp_path):
    proc = run_job("build_sft", "--config", "configs/build_sft/local.yaml", f"input={tmp_path}/absent",
                   f"output={tmp_path}/o", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "input" in proc.stderr and "make_world" in proc.stderr
    cfg = BuildSftConfig(input=str(world), output=str(tmp_path / "o"), conversations=str(tmp_path / "none.json"))
    with pytest.raises(Exception, match="conversations"):
        cfg.check_inputs()
    cfg = BuildSftConfig(input=str(world), output=str(tmp_path / "o"), location_input=str(tmp_path / "nope"))
    with pytest.raises(Exception, match="location_input.*curate"):
        cfg.check_inputs()


def test_second_run_is_skipped(world, tmp_path, capsys):
    cfg = BuildSftConfig(input=str(world), output=str(tmp_path / "o"), limit=10)
    first = run(cfg)
    mtime = (tmp_path / "o" / "base.jsonl").stat().st_mtime_ns
    second = run(cfg)
    assert "already complete" in capsys.readouterr().out
    assert second == first and (tmp_path / "o" / "base.jsonl").stat().st_mtime_ns == mtime


def test_s3_output_and_conversations(world, bucket, manifest):
    good = next(r for r in manifest if r["country"] == "JP")
    storage.write_bytes(f"s3://{bucket}/sft-in/img/a.jpg", storage.read_bytes(good["image_uri"]))
    records = [{"id": 7, "conversations": [{"from": "user", "value": "Picture 1: <img>img/a.jpg</img>\nWhere?"},
                                           {"from": "assistant", "value": "Japan, by the green plate characters."}]}]
    storage.write_text(f"s3://{bucket}/sft-in/conv.json", json.dumps(records))
    out = f"s3://{bucket}/sft"
    summary = run(BuildSftConfig(input=str(world), output=out, limit=15, conversations=f"s3://{bucket}/sft-in/conv.json"))
    assert storage.is_file(f"{out}/_SUCCESS.json") and summary["counts"]["base"] == 15
    rows = read_sft(f"{out}/reasoning.jsonl")
    conv = [r for r in rows if r["source"] == "conversations"]
    assert len(conv) == 1 and conv[0]["image_uri"] == f"s3://{bucket}/sft-in/img/a.jpg" and conv[0]["id"] == "7"
    assert len(read_sft(f"{out}/location.jsonl")) == 15 and read_sft(f"{out}/errors.jsonl") == []
