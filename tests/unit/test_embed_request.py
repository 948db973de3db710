"""worker/embed.py OpenAIEmbedder's requests, as the local embedding server receives them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from worker import embed
from worker.dev.embedserver import Faults, ServerState, hash_embedding, start_server, text_hash
from worker.embed import KNOWN_GOOD_INPUT, OpenAIEmbedder, probe
from worker.errors import EmbeddingUnavailable, InputRejected
from worker.settings import Settings

DOCUMENT = '{"input_type": "document", "user": "ingest"}'


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, ServerState]]:
    state = ServerState(faults=Faults(max_inputs=4))
    runner, url = await start_server(state)
    yield url, state
    await runner.cleanup()


def settings_for(url: str, **values: str) -> Settings:
    return Settings.load({"EMBEDDING_URL": url, "EMBEDDING_DIMENSIONS": "384", **values})


async def test_the_extra_body_goes_with_every_request_and_the_probe(server: tuple[str, ServerState]) -> None:
    url, state = server
    async with OpenAIEmbedder(settings_for(url, EMBEDDING_EXTRA_BODY=DOCUMENT)) as embedder:
        vectors = await embedder.embed(["first text", "second text"])
        await embedder.embed(["third text"])
        await probe(embedder)
    assert state.stats.extra_fields == {"input_type": {'"document"': 3}, "user": {'"ingest"': 3}}
    assert state.stats.by_text[text_hash(KNOWN_GOOD_INPUT)] == 1, "the probe is one of them"
    assert state.stats.status_counts == {200: 3}, "model, input, dimensions, encoding as before"
    assert np.array_equal(vectors[1], hash_embedding("second text", 384))


async def test_without_an_extra_body_the_request_is_as_before(server: tuple[str, ServerState]) -> None:
    url, state = server
    async with OpenAIEmbedder(settings_for(url, EMBEDDING_ENCODING="float")) as embedder:
        [vector] = await embedder.embed(["text"])
    assert state.stats.extra_fields == {}
    assert np.allclose(vector, hash_embedding("text", 384))


async def test_the_extra_body_is_parsed_once_not_per_request(
    server: tuple[str, ServerState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    settings = settings_for(url, EMBEDDING_EXTRA_BODY=DOCUMENT)
    parsed = []
    extra_body = Settings.extra_body

    def counted(self: Settings) -> object:
        parsed.append(1)
        return extra_body.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(Settings, "extra_body", property(counted))
    async with OpenAIEmbedder(settings) as embedder:
        for i in range(3):
            await embedder.embed([f"text {i}"])
    assert len(parsed) == 1
    assert state.stats.extra_fields["input_type"] == {'"document"': 3}


async def test_a_413_for_too_many_inputs_is_taken_for_the_inputs_refusal(
    server: tuple[str, ServerState],
) -> None:
    """What a provider's batch-size limit (text-embeddings-inference's 413) does to a request over
    it: InputRejected, which the embedding stage answers by halving the request (and a probe)."""
    url, _ = server
    async with OpenAIEmbedder(settings_for(url)) as embedder:
        with pytest.raises(InputRejected, match=r"413 for 5 input\(s\).*maximum allowed batch size 4"):
            await embedder.embed([f"text {i}" for i in range(5)])
        assert len(await embedder.embed([f"text {i}" for i in range(4)])) == 4


async def test_a_401_reads_the_key_file_again_and_a_rotated_key_is_used_from_then_on(
    server: tuple[str, ServerState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = server
    monkeypatch.setattr(embed, "KEY_REREAD_PAUSE", 0.01)
    key_file = tmp_path / "key"
    key_file.write_text("sk-old\n")
    state.faults = Faults(api_key="sk-old")
    async with OpenAIEmbedder(settings_for(url, EMBEDDING_API_KEY_FILE=str(key_file))) as embedder:
        await embedder.embed(["one"])
        key_file.write_text("sk-new\n")  # rotated: the new key in the file, the old one revoked
        state.faults = Faults(api_key="sk-new")
        await embedder.embed(["two"])
        await embedder.embed(["three"])
        assert state.stats.status_counts == {200: 3, 401: 1}, "one refusal, then the new key"
        state.faults = Faults(api_key="sk-revoked")  # a key nobody put in the file
        with pytest.raises(EmbeddingUnavailable) as info:
            await embedder.embed(["four"])
    assert info.value.status == 401
    assert state.stats.status_counts == {200: 3, 401: 4}, "read again twice, then it fails"


async def test_without_a_key_file_a_401_fails_at_once(server: tuple[str, ServerState]) -> None:
    url, state = server
    state.faults = Faults(api_key="sk-wanted")
    async with OpenAIEmbedder(settings_for(url, EMBEDDING_API_KEY="sk-given")) as embedder:
        with pytest.raises(EmbeddingUnavailable):
            await embedder.embed(["one"])
    assert state.stats.status_counts == {401: 1}
