"""Weights over the wire (--fetch-weights): stages without a model directory, or with a submodel
lacking layers of their plan, take the tensors from the orchestrator, verified by hash and kept
in a content-addressed cache. Greedy output equals transformers on the full model; a restart on
a warm cache transfers nothing; a transfer cut short leaves the stage serving its old range and
resumes; corrupted cache entries are found and sent again; the cache keeps its bound."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import torch

from client.client import ClientError
from client.commands_plan import reload_with_progress
from orchestrator import weight_shipping
from protos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from protos.shared.knobs import ConfigError
from protos.shared.model_files import model_fingerprint
from protos.shared.submodel import split
from stage_service.config import StageConfig
from stage_service.stage import Stage
from stage_service.weight_cache import Entry, WeightCache, file_sha256
from tests.conftest import (
    TINY_CONFIGS,
    fetching,
    in_process_mesh,
    make_tiny_model,
    reference_greedy,
)

NEW_TOKENS = 12


def prompt() -> list[int]:
    return torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_stages_without_a_model_generate_as_transformers(tiny_root, tmp_path, name, num_stages):
    model_dir = make_tiny_model(tiny_root, name)
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    with in_process_mesh(model_dir, num_stages, **fetching(tmp_path, num_stages)) as mesh:
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
        infos = [stage.info() for stage in mesh.stages]
        first = mesh.orchestrator.view
    assert result.token_ids == expected
    assert [i["weights_source"] for i in infos] == ["wire"] * num_stages
    assert all(s.fetch_bytes > 0 for s in first.stages)
    # A restart on the same caches: nothing travels, the output is the same.
    with in_process_mesh(model_dir, num_stages, **fetching(tmp_path, num_stages)) as mesh:
        again = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
        infos = [stage.info() for stage in mesh.stages]
        warm = mesh.orchestrator.view
    assert again.token_ids == expected
    assert [s.fetch_bytes for s in warm.stages] == [0] * num_stages
    assert [i["weights_source"] for i in infos] == ["cache"] * num_stages


def test_a_submodel_stage_fetches_only_the_layers_it_lacks(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")  # 4 layers
    dirs = split(model_dir, tmp_path / "split", [(0, 2), (2, 4)])
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    options = fetching(tmp_path, 2, strategy="custom", boundaries="0-1,2-3")
    options["stage_models"] = [str(d) for d in dirs]
    with in_process_mesh(model_dir, 2, **options) as mesh:
        assert [s.fetch_bytes for s in mesh.orchestrator.view.stages] == [0, 0]
        assert [st.info()["weights_source"] for st in mesh.stages] == ["submodel"] * 2
        preview = mesh.client.preview_plan(strategy="custom", boundaries="0-2,3-3")
        plan = mesh.client.reload_plan(strategy="custom", boundaries="0-2,3-3")
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
        sources = [st.info()["weights_source"] for st in mesh.stages]
        shipper = mesh.orchestrator.shipper
        layer2 = [n for n in shipper.stored if n.startswith("model.layers.2.")]
        layer2_bytes = sum(shipper.stored[n].size for n in layer2)
        # content-addressed: tensors with equal bytes (the norms' ones) travel once
        layer2_unique = sum({shipper.sha256(n): shipper.stored[n].size for n in layer2}.values())
    assert result.token_ids == expected
    assert sources == ["submodel+wire", "submodel"]
    assert [int(s["fetch_bytes"]) for s in preview["stages"]] == [layer2_bytes, 0]
    assert [int(s["fetch_bytes"]) for s in plan["stages"]] == [layer2_unique, 0]


def test_a_cut_transfer_leaves_the_old_range_serving_and_resumes(tiny_root, tmp_path, monkeypatch):
    model_dir = make_tiny_model(tiny_root, "gqa")  # 4 layers
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    options = fetching(tmp_path, 2, strategy="custom", boundaries="0-1,2-3")
    with in_process_mesh(model_dir, 2, **options) as mesh:
        shipper = mesh.orchestrator.shipper
        cache = tmp_path / "cache-1"
        before = {p.name for p in (cache / "blobs").iterdir()}
        layer1 = [n for n in shipper.stored if n.startswith("model.layers.1.")]
        unique = {shipper.sha256(n): shipper.stored[n].size for n in layer1}
        needed = sum(size for sha, size in unique.items() if sha not in before)
        monkeypatch.setattr(weight_shipping, "CHUNK_BYTES", 4096)
        whole = weight_shipping.WeightShipper._chunks

        def cut_after_four(self, *args):
            for i, chunk in enumerate(whole(self, *args)):
                if i == 4:
                    # once some arrived: a stream cancelled first drops what the stage had
                    # not read yet, and there would be nothing to resume from
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and not (
                        any((cache / "partial").iterdir())
                        or {p.name for p in (cache / "blobs").iterdir()} - before
                    ):
                        time.sleep(0.01)
                    raise ConnectionError("the link went down")
                yield chunk

        monkeypatch.setattr(weight_shipping.WeightShipper, "_chunks", cut_after_four)
        with pytest.raises(ClientError) as err:
            mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
        assert "the next reload resumes from there" in err.value.message
        # the old plan still serves, exactly
        assert mesh.orchestrator.router.plan.ranges[1].start == 2
        assert mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS).token_ids == (
            expected
        )
        kept = sum(p.stat().st_size for p in (cache / "partial").iterdir())
        kept += sum(p.stat().st_size for p in (cache / "blobs").iterdir() if p.name not in before)
        assert 0 < kept < needed
        monkeypatch.setattr(weight_shipping.WeightShipper, "_chunks", whole)
        plan = mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
    assert int(plan["stages"][1]["fetch_bytes"]) == needed - kept
    assert result.token_ids == expected


def test_a_corrupted_cache_entry_is_found_and_sent_again(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)) as mesh:
        mesh.client.generate(token_ids=prompt(), max_new_tokens=2)
    blob = max((tmp_path / "cache-1" / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)) as mesh:
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
        sent = [s.fetch_bytes for s in mesh.orchestrator.view.stages]
    assert sent == [0, len(data)]
    assert file_sha256(blob) == blob.name
    assert result.token_ids == expected


def entry(name: str, data: bytes) -> Entry:
    return Entry(name, hashlib.sha256(data).hexdigest(), len(data), (len(data) // 4,), "F32")


def test_the_cache_keeps_its_bound_and_checks_what_it_receives(tmp_path):
    cache = WeightCache(tmp_path, limit_bytes=1000)
    a, b, c = (bytes([i]) * 400 for i in (1, 2, 3))
    ea, eb, ec = entry("a", a), entry("b", b), entry("c", c)
    assert cache.offer([ea, eb]).needs == {ea.sha256: 0, eb.sha256: 0}
    with pytest.raises(InvalidArgument, match="offset 8"):
        cache.write(ea.sha256, 8, a[:8])  # not where the kept bytes end
    with pytest.raises(InvalidArgument, match="not in the last offer"):
        cache.write(ec.sha256, 0, c)
    assert cache.write(ea.sha256, 0, a[:100]) is False  # kept: a resume starts at 100
    assert cache.offer([ea, eb]).needs == {ea.sha256: 100, eb.sha256: 0}
    assert cache.write(ea.sha256, 100, a[100:]) is True
    with pytest.raises(FailedPrecondition, match="do not hash"):
        cache.write(eb.sha256, 0, a)  # the wrong bytes: dropped
    assert cache.offer([ea, eb]).needs == {eb.sha256: 0}
    assert cache.write(eb.sha256, 0, b) is True
    cache.touch(eb.sha256)  # a is now the least recently used
    answer = cache.offer([eb, ec])
    assert answer.needs == {ec.sha256: 0} and answer.cached_bytes == 400
    assert not cache.path(ea.sha256).exists() and cache.path(eb.sha256).exists()
    with pytest.raises(ResourceExhausted, match="--weights-cache-mb"):
        cache.offer([entry(str(i), bytes([i]) * 400) for i in range(3)])


def test_offers_that_cannot_be_taken_are_refused(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    other = make_tiny_model(tiny_root / "other", "gqa", seed=1)
    config = (model_dir / "config.json").read_text()
    shipped = Stage(StageConfig(model="", fetch_weights=True, weights_cache=str(tmp_path / "c")))
    bad = Entry("x", "0" * 64, 12, (4,), "I64")
    with pytest.raises(InvalidArgument, match="dtype 'I64'"):
        shipped.offer_weights("f", config, [bad])
    with pytest.raises(InvalidArgument, match="do not make"):
        shipped.offer_weights("f", config, [Entry("x", "0" * 64, 12, (4,), "F32")])
    with pytest.raises(InvalidArgument, match="not a Llama config"):
        shipped.offer_weights("f", "{}", [])
    with pytest.raises(FailedPrecondition, match="no model directory and no weights"):
        shipped.load_layers(0, 1, 1)
    local = Stage(StageConfig(model=str(model_dir)))
    with pytest.raises(FailedPrecondition, match="without --fetch-weights"):
        local.offer_weights(model_fingerprint(model_dir), config, [])
    theirs = Stage(StageConfig(model=str(other), fetch_weights=True, weights_cache=str(tmp_path)))
    with pytest.raises(FailedPrecondition, match="give them the same model"):
        theirs.offer_weights(model_fingerprint(model_dir), config, [])
    with pytest.raises(ConfigError, match="--fetch-weights"):
        StageConfig(model="")


def test_one_process_uses_a_cache_directory_at_a_time(tmp_path):
    first = WeightCache(tmp_path, limit_bytes=1000)
    with pytest.raises(FailedPrecondition, match="its own --weights-cache"):
        WeightCache(tmp_path, limit_bytes=1000)
    first.close()
    WeightCache(tmp_path, limit_bytes=1000).close()


@pytest.mark.slow
@pytest.mark.parametrize("num_stages", [2, 3])
def test_default_model_over_the_wire_generates_as_transformers(default_model, tmp_path, num_stages):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(default_model))("The history of the Roman Empire")
    ids = ids["input_ids"]
    expected = reference_greedy(default_model, ids, NEW_TOKENS)
    with in_process_mesh(default_model, num_stages, **fetching(tmp_path, num_stages)) as mesh:
        result = mesh.client.generate(token_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        sources = [stage.info()["weights_source"] for stage in mesh.stages]
    assert sources == ["wire"] * num_stages
    assert result.token_ids == expected


def test_plan_reload_prints_the_transfer_while_it_runs(tiny_root, tmp_path, monkeypatch, capsys):
    model_dir = make_tiny_model(tiny_root, "gqa")  # 4 layers
    options = fetching(tmp_path, 2, strategy="custom", boundaries="0-1,2-3")
    with in_process_mesh(model_dir, 2, **options) as mesh:
        monkeypatch.setattr(weight_shipping, "CHUNK_BYTES", 8192)
        whole = weight_shipping.WeightShipper._chunks

        def slowly(self, *args):
            for chunk in whole(self, *args):
                time.sleep(0.05)
                yield chunk

        monkeypatch.setattr(weight_shipping.WeightShipper, "_chunks", slowly)
        spec = dict(strategy="custom", boundaries="0-0,1-3")
        plan = reload_with_progress(mesh.client, spec, every_s=0.1)
    lines = [line for line in capsys.readouterr().err.splitlines() if "weights" in line]
    assert lines, "no progress was printed"
    assert all(re.search(r"MB, \d+ MB/s, ETA", line) for line in lines), lines
    assert lines[0].startswith(mesh.addresses[1])
    assert int(plan["stages"][1]["fetch_bytes"]) > 0
