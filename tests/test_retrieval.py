"""Retrieval: build_index (CLIP gallery + FAISS), geolocate with engine=knn, and the no-leakage check."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from georeasoner.core import storage
from georeasoner.core.config import ConfigError, load_config
from georeasoner.core.runner import main
from georeasoner.evaluation.evaluate import EvaluateConfig
from georeasoner.evaluation.evaluate import run as evaluate
from georeasoner.geolocate.batch import GeolocateConfig
from georeasoner.geolocate.batch import run as geolocate
from georeasoner.retrieval import LeakageError, check_no_leakage, find_leaks
from georeasoner.retrieval.gallery import CARD_FILE, INDEX_FILE, ROWS_FILE, BuildIndexConfig, Gallery, embeddings_of
from georeasoner.retrieval.gallery import run as build_index
from georeasoner.retrieval.index import IndexSpec, build_index as faiss_index, read_index, write_index
from georeasoner.retrieval.knn import vote
from georeasoner.core.images import decode_image
from georeasoner.geo import country_name
from georeasoner.geolocate.batch import VLMModel
from georeasoner.retrieval.neighbours import NeighbourSpec, Neighbours
from georeasoner.vlm.answers import ANSWER_SCHEMA
from georeasoner.vlm.prompts import INFERENCE_PROMPT, NEAR_INTRO, with_neighbours
from georeasoner.vlm.sft import BuildSftConfig, picked, read_sft
from georeasoner.vlm.sft import run as build_sft
from conftest import REPO
from test_baseline import _clip_package


def _manifest(world) -> list[dict]:
    return storage.read_parquet(str(world / "manifest.parquet")).to_pylist()


def test_build_index_gallery_parts_index_and_card(world, gallery):
    out, encoder, summary = gallery
    train = [r for r in _manifest(world) if r["split"] == "train"]
    table = storage.read_parquet(out)  # the folder reads as one table: the parts (sidecars start with _)
    assert table.column_names == ["image_uri", "lat", "lon", "country", "city", "embedding", "error", "model_version"]
    assert sorted(table.column("image_uri").to_pylist()) == sorted(r["image_uri"] for r in train)  # train only, once each
    truth = {r["image_uri"]: r for r in train}
    for row in table.to_pylist():  # the labels are the manifest's, carried by the engine
        want = truth[row["image_uri"]]
        assert (row["lat"], row["lon"], row["country"], row["city"]) == (want["lat"], want["lon"], want["country"], want["city"])
        assert row["error"] is None and row["model_version"].startswith("clip-random-")
    vectors = embeddings_of(table)
    assert vectors.shape == (len(train), 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    card = storage.read_json(f"{out}/{CARD_FILE}")
    assert card["kind"] == "retrieval_index" and card["count"] == len(train) and card["dimension"] == 128
    assert card["encoder"]["version"] == table.column("model_version")[0].as_py() and card["splits"] == ["train"]
    assert card["faiss"] == "IndexFlat" and summary["counts"]["indexed"] == len(train) and summary["counts"]["errors"] == 0
    # every gallery vector finds itself first: index ids and _index_rows agree
    g = Gallery.read(out)
    sims, ids = g.search(vectors[:20], 1)
    ids_uris = g.rows.column("image_uri").to_pylist()
    assert [ids_uris[i] for i in ids[:, 0]] == table.column("image_uri").to_pylist()[:20]
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5)


def test_knn_geolocate_answers_each_test_image_once_and_evaluates(world, gallery, tmp_path):
    out, _, _ = gallery
    test = [r for r in _manifest(world) if r["split"] == "test"]
    answers = str(tmp_path / "answers")
    summary = geolocate(GeolocateConfig(input=str(world), splits=["test"], engine="knn", index=out, k=8,
                                        output=answers, batch_size=32))
    table = storage.read_parquet(answers)
    assert table.schema.remove_metadata() == ANSWER_SCHEMA
    assert sorted(table.column("image_uri").to_pylist()) == sorted(r["image_uri"] for r in test)
    assert summary["counts"]["duplicates"] == 0 and summary["counts"]["missing"] == 0
    gallery_places = {(r["country"], r["city"]) for r in _manifest(world) if r["split"] == "train"}
    for r in table.to_pylist():
        assert r["error"] is None and (r["country"], r["city"]) in gallery_places  # the medoid neighbour's label
        assert 0 < r["confidence"] <= 1 and "of the 8 nearest gallery images are in" in r["reasons"]
        assert r["model_version"] == storage.read_json(f"{out}/{CARD_FILE}")["version"]
    metrics = evaluate(EvaluateConfig(input=answers, manifest=str(world), splits=["test"], output=str(tmp_path / "eval"),
                                      report=False))
    assert metrics["counts"]["items"] == len(test) and metrics["counts"]["answered"] == len(test)
    # the train-only gallery holds none of the evaluated images
    report = check_no_leakage(out, answers)
    assert report["evaluated"] == report["embedded"] == len(test) and not report["by_uri"] and not report["by_embedding"]


def test_vote_weighted_country_medoid_and_reasons():
    osaka, tokyo, seoul = (34.69, 135.50), (35.68, 139.69), (37.57, 126.98)
    rows = ([{"country": "JP", "city": "Osaka", "lat": osaka[0], "lon": osaka[1]}] * 3
            + [{"country": "JP", "city": "Tokyo", "lat": tokyo[0], "lon": tokyo[1]}] * 2
            + [{"country": "KR", "city": "Seoul", "lat": seoul[0], "lon": seoul[1]}] * 4)
    sims = np.array([0.9] * 5 + [0.5] * 4)
    a = vote(rows, sims)
    assert a["country"] == "JP" and a["city"] == "Osaka" and (a["lat"], a["lon"]) == osaka
    assert a["confidence"] == pytest.approx(4.5 / 6.5, rel=1e-6)
    assert a["reasons"].startswith("5 of the 9 nearest gallery images are in Japan (Osaka ×3, Tokyo ×2)")
    assert vote(rows, np.array([0.1] * 5 + [0.9] * 4))["country"] == "KR"  # similarity outweighs count


def test_leakage_check_fails_when_test_images_are_in_the_gallery(ray_session, world, tmp_path, bucket):
    from samples import bad_files

    manifest = _manifest(world)
    train = [r for r in manifest if r["split"] == "train"][:12]
    test = [r for r in manifest if r["split"] == "test"]
    copy = str(tmp_path / "copy-of-a-test-image.jpg")  # the same picture under another name
    storage.write_bytes(copy, storage.read_bytes(test[1]["image_uri"]))
    broken = str(tmp_path / "truncated.jpg")
    storage.write_bytes(broken, bad_files()["truncated.jpg"][0])
    rows = train + [dict(test[0], split="train"), dict(test[1], image_uri=copy, split="train"),
                    dict(train[0], image_uri=broken)]
    storage.write_parquet(pa.Table.from_pylist(rows), str(tmp_path / "leaky" / "manifest.parquet"))
    out = f"s3://{bucket}/leaky-index"
    summary = build_index(BuildIndexConfig(input=str(tmp_path / "leaky"), encoder=_clip_package(tmp_path), output=out))
    # the undecodable image is an error row, counted, and not indexed
    assert summary["counts"]["items"] == len(rows) and summary["counts"]["errors"] == 1
    assert summary["counts"]["indexed"] == len(rows) - 1 and summary["errors_by_kind"] == {"truncated": 1}
    g = Gallery.read(out)
    assert g.index.ntotal == len(rows) - 1 and broken not in g.rows.column("image_uri").to_pylist()
    assert storage.read_parquet(out).filter(pc.is_valid(pc.field("error"))).num_rows == 1
    evaluated = [r["image_uri"] for r in test]
    report = find_leaks(out, evaluated)
    assert report["by_uri"] == [test[0]["image_uri"]]
    assert [(a, b) for a, b, _ in report["by_embedding"]] == [(test[1]["image_uri"], copy)]
    with pytest.raises(LeakageError, match=r"1 evaluated image\(s\) are in gallery .* by URI and 1 by an identical embedding"):
        check_no_leakage(out, evaluated)
    check_no_leakage(out, evaluated[2:])  # the other test images are not in it


def test_index_kinds_recall_and_s3_roundtrip(s3_server, bucket):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, 64))
    x = (centres[rng.integers(0, 100, 3000)] + 0.3 * rng.normal(size=(3000, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + 0.01 * rng.normal(size=(100, 64)).astype(np.float32)
    exact = faiss_index(x, IndexSpec(kind="flat"))
    _, truth = exact.search(q, 10)
    for spec in (IndexSpec(kind="ivfpq", nlist=32, nprobe=8, pq_m=8, pq_bits=6, refine_k=8),
                 IndexSpec(kind="hnsw", hnsw_m=16, ef_search=64)):
        uri = f"s3://{bucket}/{spec.kind}.faiss"
        assert write_index(faiss_index(x, spec), uri) == storage.size(uri)
        index = read_index(uri, spec)
        _, found = index.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
        assert recall >= 0.9, (spec.kind, recall)
    with pytest.raises(ValueError, match="too small for index.kind=ivfpq"):
        faiss_index(x[:50], IndexSpec(kind="ivfpq", pq_m=8, pq_bits=6))


def test_config_errors_exit_2_with_one_line(world, gallery, tmp_path, capsys):
    out, encoder, _ = gallery
    geo = ["--config", "configs/geolocate/local.yaml", f"input={world}", "scores=null", f"output={tmp_path / 'a'}",
           "engine=knn"]
    build = ["--config", "configs/build_index/local.yaml", f"input={world}", f"encoder={encoder}",
             f"output={tmp_path / 'b'}"]
    cases = [
        ("geolocate", GeolocateConfig, geo + ["index=null"], "engine knn needs index", "jobs/build_index.py"),
        ("geolocate", GeolocateConfig, geo + [f"index={tmp_path / 'none'}"], "does not exist", "jobs/build_index.py"),
        ("geolocate", GeolocateConfig, geo + [f"index={world}"], "is not a finished build_index output", "_index_card.json"),
        ("geolocate", GeolocateConfig, geo + [f"index={out}", "engine=faiss"], "engine", "'vlm' or 'knn'"),
        ("build_index", BuildIndexConfig, build + [f"encoder={world}"], "is not a CLIP package", "pretrain_clip"),
        ("build_index", BuildIndexConfig, build + [f"input={tmp_path}"], "is not a manifest", "make_world"),
        ("build_index", BuildIndexConfig, build + ["index.kind=ivfpq", "index.pq_m=48"], "pq_m 48", "dimension 128"),
        ("build_index", BuildIndexConfig, build + ["index.kind=ivf"], "index.kind", "'flat', 'ivfpq' or 'hnsw'"),
    ]
    from georeasoner.geolocate.batch import run as geo_run

    for job, model, argv, want, names in cases:
        code = main(job, model, geo_run if job == "geolocate" else build_index, argv=argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        first = err.splitlines()[0]
        assert want in first and names in first, (argv, err)
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="engine vlm needs model"):  # in-process too, before any work
        geo_run(GeolocateConfig(input=str(world), output=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()


def test_configs_parse_and_vlm_hash_unchanged():
    local = load_config(BuildIndexConfig, REPO / "configs" / "build_index" / "local.yaml")
    assert local.output == "outputs/local/index" and local.splits == ["train"] and local.index.kind == "flat"
    cluster = load_config(BuildIndexConfig, REPO / "configs" / "build_index" / "cluster.yaml")
    assert cluster.index.kind == "ivfpq" and cluster.encoder.startswith("s3://") and cluster.actor_gpus == 1
    geo = load_config(GeolocateConfig, REPO / "configs" / "geolocate" / "local.yaml")
    assert geo.engine == "vlm" and geo.index == "outputs/local/index" and geo.k == 16 and geo.prompt_k == 5
    # with fusion (the default) the neighbours' vote shapes a VLM run's answers; without it k does not
    assert geo.fusion and geo.config_hash() != geo.model_copy(update={"k": 3}).config_hash()
    single = geo.model_copy(update={"fusion": False})
    assert single.config_hash() == single.model_copy(update={"k": 3, "vote_weight": 0.0}).config_hash()
    assert single.config_hash() != geo.config_hash()
    assert geo.config_hash() != geo.model_copy(update={"index": "elsewhere"}).config_hash()
    assert geo.config_hash() != geo.model_copy(update={"prompt_k": 3}).config_hash()
    plain = geo.model_copy(update={"index": None})
    assert plain.config_hash() == plain.model_copy(update={"prompt_k": 3}).config_hash()  # no index: no prompt keys
    assert geo.config_hash() != geo.model_copy(update={"engine": "knn"}).config_hash()
    sft = load_config(BuildSftConfig, REPO / "configs" / "build_sft" / "local.yaml")
    assert sft.neighbours.index == "outputs/local/index" and sft.neighbours.k == geo.prompt_k


def test_neighbours_leave_out_the_own_image_and_name_places_in_the_prompt(world, gallery):
    out, _, _ = gallery
    g = Gallery.read(out)
    uris = g.rows.column("image_uri").to_pylist()  # in index id order
    parts = storage.read_parquet(out)
    by_uri = dict(zip(parts.column("image_uri").to_pylist(), embeddings_of(parts)))
    vectors = np.stack([by_uri[u] for u in uris])
    nb = Neighbours(NeighbourSpec(index=out, k=3, far=2))
    labels = {u: (c, n) for u, c, n in zip(uris, g.rows.column("city").to_pylist(), g.rows.column("country").to_pylist())}
    sims, ids = g.search(vectors[:10], 4)
    plain = nb.of_vectors(vectors[:10])
    own = nb.of_vectors(vectors[:10], uris[:10])
    for i in range(10):
        assert ids[i, 0] == i and len(plain[i]["near"]) == 3 and len(own[i]["near"]) == 3 and len(own[i]["far"]) == 2
        assert plain[i]["near"][0] == nb.labels[i]  # without exclusion the image finds itself first
        assert own[i]["near"] == [nb.labels[j] for j in ids[i, 1:4]]  # with it, the next three
    # a copy of an image under another key is left out too (identical embedding)
    copy = nb.of_vectors(vectors[:1], ["s3://elsewhere/copy.jpg"])[0]
    assert copy["near"] == [nb.labels[j] for j in ids[0, 1:4]]
    question = with_neighbours("Where?", own[0]["near"], own[0]["far"])
    city, country = own[0]["near"][0]
    assert question.startswith(f"Where? The most similar geotagged images are from: {city}, {country};")
    assert _places_named(question) == 3 and "The least similar are from:" in question
    code = labels[uris[0]][1]  # the gallery stores ISO2 codes; the prompt names the country
    assert nb.labels[0] == (labels[uris[0]][0], country_name(code)) and country_name(code) != code


def _places_named(prompt: str) -> int:
    """How many neighbours the prompt's 'most similar' list names (``City, Country; City, Country.``)."""
    listed = prompt.split(NEAR_INTRO, 1)[1].split(" The least similar", 1)[0].strip().rstrip(".")
    return len(listed.split(";"))


def test_neighbours_named_nearest_first():
    near = [("Lyon", "France"), ("Osaka", "Japan"), (None, "Japan")]
    assert with_neighbours("Q?", near, [("Perth", "Australia")]) == (
        "Q? The most similar geotagged images are from: Lyon, France; Osaka, Japan; Japan. "
        "The least similar are from: Perth, Australia.")
    assert with_neighbours("Q?", []) == "Q?"


def test_build_sft_names_neighbours_in_a_share_of_stage2_prompts(world, gallery, tmp_path):
    out, _, _ = gallery
    summary = build_sft(BuildSftConfig(input=str(world), output=str(tmp_path / "sft"),
                                       neighbours=NeighbourSpec(index=out, k=4), neighbours_share=0.5))
    rows = read_sft(str(tmp_path / "sft" / "location.jsonl"))
    with_nb = [r for r in rows if NEAR_INTRO in r["prompt"]]
    assert summary["counts"]["with_neighbours"] == len(with_nb) and summary["counts"]["neighbours_unreadable"] == 0
    assert 0.3 * len(rows) < len(with_nb) < 0.7 * len(rows)
    for r in with_nb:
        assert r["prompt"].startswith(INFERENCE_PROMPT) and _places_named(r["prompt"]) == 4
    assert {r["id"] for r in with_nb} == {r["id"] for r in rows if picked(0, r["image_uri"], 0.5)}
    # the other sets are untouched
    assert not any(NEAR_INTRO in r["prompt"] for r in read_sft(str(tmp_path / "sft" / "reasoning.jsonl")))


def test_vlm_geolocate_with_an_index_answers_each_key_once(world, gallery, tmp_path):
    out, _, _ = gallery
    test = [r for r in _manifest(world) if r["split"] == "test"][:6]
    answers = str(tmp_path / "answers")
    summary = geolocate(GeolocateConfig(input=str(world), splits=["test"], engine="vlm", model="tiny:qwen2-vl",
                                        index=out, prompt_k=3, limit=6, max_new_tokens=4, output=answers, batch_size=3))
    table = storage.read_parquet(answers)
    assert sorted(table.column("image_uri").to_pylist()) == sorted(r["image_uri"] for r in test)
    assert summary["counts"]["missing"] == 0 and summary["counts"]["errors"] == 0
    index_version = storage.read_json(f"{out}/{CARD_FILE}")["version"]
    # fused by default: the version names the gallery and how the answers combine
    assert all(v.endswith(f"+{index_version}+fused-k16-w1") for v in table.column("model_version").to_pylist())
    model = VLMModel("tiny:qwen2-vl", "cpu", None, 2, 0, NeighbourSpec(index=out, k=3))
    arrays = [np.asarray(decode_image(storage.read_bytes(r["image_uri"]))) for r in test[:2]]
    questions = model.retrieval.neighbours.questions(model.geolocator.question, arrays)
    assert all(q.startswith(model.geolocator.question + " " + NEAR_INTRO) and _places_named(q) == 3 for q in questions)


def _generation(country, logprobs: dict[str, float], city=None, reasons="r"):
    import math

    norm = math.log(sum(math.exp(v) for v in logprobs.values()))
    return {"country": country, "city": city, "lat": 1.0, "lon": 2.0, "reasons": reasons, "confidence": 0.5,
            "raw_text": f"{country} {city}", "country_logprobs": {c: v - norm for c, v in logprobs.items()}}


def test_fusion_combines_both_answers_with_the_neighbours_vote():
    from georeasoner.retrieval.fusion import fuse

    plain = _generation("FR", {"FR": -0.9, "DE": -1.1, "JP": -3.0}, city="Lyon", reasons="plain")
    prompted = _generation("DE", {"FR": -1.2, "DE": -0.8, "JP": -3.0}, city="Berlin", reasons="prompted")
    # no vote: the mean log-probability decides (FR -1.05 vs DE -0.95), the answer that named it is written
    alone = fuse([plain, prompted], [], vote_weight=0.0)
    assert alone["country"] == "DE" and alone["city"] == "Berlin" and alone["reasons"] == "prompted"
    assert "country_logprobs" not in alone and 0.0 < alone["confidence"] < 1.0
    # neighbours that are all in France turn it; the French answer's city and reasons come with it
    french = [("FR", "Paris", 0.9)] * 8
    turned = fuse([plain, prompted], french, vote_weight=1.0)
    assert turned["country"] == "FR" and turned["city"] == "Lyon" and turned["reasons"] == "plain"
    assert turned["confidence"] > alone["confidence"]
    # a country neither answer named: the city of its neighbours, coordinates from GeoNames
    japan = [("JP", "Osaka", 0.9)] * 16
    far = fuse([plain, prompted], japan, vote_weight=3.0)
    assert far["country"] == "JP" and far["city"] == "Osaka" and far["lat"] == pytest.approx(34.69, abs=0.1)
    assert far["reasons"] in ("plain", "prompted")
    # weak, split neighbours do not overturn the VLM
    split = [("JP", "Osaka", 0.2), ("FR", "Paris", 0.2), ("DE", "Berlin", 0.2)]
    assert fuse([plain, prompted], split, vote_weight=1.0)["country"] == "DE"
    # an answer without a country value passes through
    bare = {"country": None, "city": None, "lat": None, "lon": None, "reasons": "", "confidence": 0.0,
            "raw_text": "?", "country_logprobs": None}
    assert fuse([bare, dict(bare)], french, vote_weight=1.0)["raw_text"] == "?"


def test_country_logprobs_are_read_where_the_country_value_is_written():
    from georeasoner.vlm.model import load_vlm
    from georeasoner.vlm.predict import _country_first_tokens, _value_tokens

    tok = load_vlm("tiny:qwen2-vl").processor.tokenizer
    text = '{"reasons": "Cars drive on the left.", "country": "Japan", "city": "Osaka"}'
    ids = tok(text, add_special_tokens=False).input_ids
    hits = _value_tokens(tok, ids, text)
    assert hits and tok.decode([ids[hits[0]]]).strip() == "Japan"
    assert _value_tokens(tok, ids[:5], '{"reasons": "x"') == []
    codes, first = _country_first_tokens(tok)
    assert len(codes) == len(set(codes)) == len(first) == len(set(first)) and "JP" in codes
    assert first[codes.index("JP")] == ids[hits[0]]
