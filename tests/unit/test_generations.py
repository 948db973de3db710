"""What settings may name of the index's generations, and what `reindex start` may be asked for."""

from __future__ import annotations

import pytest

from worker import generations
from worker.errors import ConfigError
from worker.generations import Generation
from worker.reindex import Wanted, resumable
from worker.settings import Settings

SERVED = Generation(1, "small", 384, "vector", 1000, 100, "chars", "served")
BUILDING = Generation(2, "large", 1024, "halfvec", 1000, 100, "chars", "building")


def settings(**values: str) -> Settings:
    base = {
        "EMBEDDING_MODEL": "small",
        "EMBEDDING_DIMENSIONS": "384",
        "CHUNK_SIZE": "1000",
        "CHUNK_OVERLAP": "100",
    }
    return Settings.load({**base, **values})


def test_settings_may_name_any_live_generation() -> None:
    assert generations.check_settings(settings(), [SERVED, BUILDING]) == SERVED
    named = settings(EMBEDDING_MODEL="large", EMBEDDING_DIMENSIONS="1024", VECTOR_TYPE="halfvec")
    assert generations.check_settings(named, [SERVED, BUILDING]) == BUILDING


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"EMBEDDING_MODEL": "other"}, "EMBEDDING_MODEL"),
        ({"EMBEDDING_DIMENSIONS": "256"}, "EMBEDDING_DIMENSIONS"),
        ({"VECTOR_TYPE": "halfvec"}, "VECTOR_TYPE"),
        ({"CHUNK_SIZE": "800"}, "CHUNK_SIZE"),
    ],
)
def test_settings_naming_no_generation_are_refused_naming_the_setting_and_the_served_one(
    values: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        generations.check_settings(settings(**values), [SERVED, BUILDING])
    assert refused.value.setting == setting
    if setting != "CHUNK_SIZE":
        assert "#1 (small, vector(384), chunks of 1000/100) is served" in str(refused.value)
        assert "#2 (large, halfvec(1024), chunks of 1000/100) building" in str(refused.value)


def test_commands_that_write_no_chunks_take_another_chunking() -> None:
    assert generations.check_settings(settings(CHUNK_SIZE="800"), [SERVED], chunking=False) == SERVED


def test_a_generation_gives_its_own_settings_and_keeps_the_rest() -> None:
    mine = BUILDING.settings(settings(EMBEDDING_URL="http://api.example/v1"))
    assert (mine.embedding_model, mine.embedding_dimensions, mine.vector_type) == ("large", 1024, "halfvec")
    assert mine.embedding_url == "http://api.example/v1"
    base = settings()
    assert SERVED.settings(base) is base


def test_what_start_is_asked_for_defaults_to_the_served_generation() -> None:
    wanted = Wanted(model="large", dimensions=1024).of(SERVED, settings())
    assert (wanted.model, wanted.dimensions, wanted.vector_type, wanted.chunking) == (
        "large",
        1024,
        "vector",
        (1000, 100, "chars"),
    )
    assert Wanted(chunk_size=400, chunk_overlap=40).of(SERVED, settings()).chunking == (400, 40, "chars")


@pytest.mark.parametrize(
    ("wanted", "flag"),
    [
        (Wanted(dimensions=3000), "--dimensions"),  # more than an HNSW index on vector takes
        (Wanted(chunk_size=100, chunk_overlap=60), "--chunk-overlap"),
    ],
)
def test_start_refuses_what_settings_would_refuse_naming_its_flag(wanted: Wanted, flag: str) -> None:
    with pytest.raises(ConfigError) as refused:
        wanted.of(SERVED, settings())
    assert refused.value.setting == flag


def test_start_resumes_the_generation_being_built_and_refuses_anything_else() -> None:
    same = Generation(0, "large", 1024, "halfvec", 1000, 100, "chars", "building")
    assert resumable([SERVED, BUILDING], same) == BUILDING
    assert resumable([SERVED], same) is None
    with pytest.raises(ConfigError, match="nothing to build"):
        resumable([SERVED], Generation(0, "small", 384, "vector", 1000, 100, "chars", "building"))
    other = Generation(0, "large", 512, "halfvec", 1000, 100, "chars", "building")
    with pytest.raises(ConfigError, match="one generation beside the served one at a time"):
        resumable([SERVED, BUILDING], other)
    kept = Generation(2, "large", 1024, "halfvec", 1000, 100, "chars", "kept")
    with pytest.raises(ConfigError, match="reindex rollback"):
        resumable([SERVED, kept], same)
