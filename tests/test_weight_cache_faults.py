"""Faults of weights over the wire (--fetch-weights) that a stage must survive: its files
rewritten under it (a stage serves from memory it verified, never from a file another process
can change), a corruption that keeps a file's size, mtime and inode, a transfer cut short, and
a weights cache the stage cannot write (a precise status, the truth about what was kept, and
recovery once the disk is writable again)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from client.client import ClientError
from orchestrator import weight_shipping
from orchestrator.weight_shipping import Transfer, WeightShipper
from protos import llamadist_pb2 as pb
from protos.errors import FailedPrecondition
from protos.shared.model_files import model_fingerprint, safetensors_files, safetensors_header
from stage_service.config import StageConfig
from stage_service.stage import Stage
from stage_service.weight_cache import Entry, file_sha256
from tests.conftest import fetching, in_process_mesh, make_tiny_model, reference_greedy

NEW_TOKENS = 8


def prompt() -> list[int]:
    return torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(5)).tolist()


def rewrite_in_place(path: Path, start: int, end: int, byte: int) -> None:
    """Overwrites bytes [start, end) of `path` through the same inode, as another process
    writing into the file would (no new file, no rename)."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes([byte]) * (end - start))


CORRUPTIONS = {
    "nan": lambda size: (0, size // 3, 0xFF),  # float32 NaNs over a third of the tensor
    "zeros": lambda size: (size // 2, size, 0x00),  # its second half zeroed
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_rewriting_cache_files_does_not_change_a_running_stage(tiny_root, tmp_path, kind):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)) as mesh:
        assert mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS).token_ids == (
            expected
        )
        for blob in (tmp_path / "cache-1" / "blobs").iterdir():
            rewrite_in_place(blob, *CORRUPTIONS[kind](blob.stat().st_size))
        after = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
    assert after.token_ids == expected


def test_rewriting_the_model_directory_does_not_change_a_running_stage(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    own = shutil.copytree(model_dir, tmp_path / "stage-model")
    with in_process_mesh(model_dir, 2, stage_models=[own, own]) as mesh:
        assert mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS).token_ids == (
            expected
        )
        for path in safetensors_files(own):
            data_start = 8 + len(safetensors_header(path))
            rewrite_in_place(path, data_start, path.stat().st_size, 0xFF)
        after = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
    assert after.token_ids == expected


def test_a_corruption_that_keeps_size_mtime_and_inode_is_found_at_restart(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)) as mesh:
        mesh.client.generate(token_ids=prompt(), max_new_tokens=2)
    blob = max((tmp_path / "cache-1" / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    before = blob.stat()
    rewrite_in_place(blob, 0, before.st_size // 2, 0x00)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = blob.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    with in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)) as mesh:
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
        sent = [s.fetch_bytes for s in mesh.orchestrator.view.stages]
    assert sent == [0, before.st_size]  # found by its content, and sent again
    assert file_sha256(blob) == blob.name
    assert result.token_ids == expected


def ship_range(
    stage: Stage, model_dir: Path, hashes: Path, start: int, end: int, chunks_sent: int = -1
) -> None:
    """What the orchestrator does before it assigns [start, end): offer, then send what lacks
    (or only its first `chunks_sent` chunks, a stream that ends early)."""
    shipper = WeightShipper(model_dir, model_fingerprint(model_dir), hashes)
    manifest = shipper.manifest(shipper.lacking(start, end, pb.StageInfo(**stage.info())))
    entries = [
        Entry(t.name, t.sha256, t.size_bytes, tuple(t.shape), t.dtype) for t in manifest.tensors
    ]
    answer = stage.offer_weights(manifest.model_fingerprint, manifest.config_json, entries)
    needs = [pb.WeightNeed(sha256=s, have_bytes=h) for s, h in answer.needs.items()]
    by_sha = {t.sha256: shipper.stored[t.name] for t in manifest.tensors}
    chunks = shipper._chunks(needs, by_sha, Transfer(1), "test")
    if chunks_sent >= 0:
        chunks = itertools.islice(chunks, chunks_sent)
    stage.receive_weights((c.sha256, c.offset, c.data) for c in chunks)


def test_a_cache_entry_changed_after_its_offer_is_refused_at_load(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    cache = tmp_path / "cache"
    stage = Stage(StageConfig(model="", fetch_weights=True, weights_cache=str(cache)))
    try:
        ship_range(stage, model_dir, tmp_path / "hashes", 0, 4)
        blob = max((cache / "blobs").iterdir(), key=lambda p: p.stat().st_size)
        rewrite_in_place(blob, 0, 64, 0x00)
        with pytest.raises(FailedPrecondition, match=blob.name[:12]) as err:
            stage.load_layers(0, 4, 1)
        assert "sends it again" in str(err.value)
        assert not blob.exists()  # dropped: the next offer asks for it
        assert stage.ready()[0] is False
        ship_range(stage, model_dir, tmp_path / "hashes", 0, 4)
        stage.load_layers(0, 4, 2)
        assert stage.ready() == (True, "")
    finally:
        stage.close()


def kept_on_disk(cache: Path, before: set[str]) -> int:
    """Bytes of partial files and of complete entries that were not in `before`."""
    kept = sum(p.stat().st_size for p in (cache / "partial").iterdir())
    return kept + sum(p.stat().st_size for p in (cache / "blobs").iterdir() if p.name not in before)


def stage_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("stage_service") and r.levelno == logging.WARNING
    ]


def test_a_cut_transfer_is_logged_as_cut_not_as_an_internal_error(
    tiny_root, tmp_path, monkeypatch, caplog
):
    model_dir = make_tiny_model(tiny_root, "gqa")  # 4 layers
    options = fetching(tmp_path, 2, strategy="custom", boundaries="0-1,2-3")
    with in_process_mesh(model_dir, 2, **options) as mesh:
        cache = tmp_path / "cache-1"
        before = {p.name for p in (cache / "blobs").iterdir()}
        monkeypatch.setattr(weight_shipping, "CHUNK_BYTES", 4096)
        whole = weight_shipping.WeightShipper._chunks

        def cut_after_four(self, *args):
            for i, chunk in enumerate(whole(self, *args)):
                if i == 4:
                    # cut once the stage is reading the stream (bytes on its disk): cut earlier,
                    # on a loaded machine, and the call may end before its handler runs at all,
                    # which then has nothing to say
                    waited = time.monotonic() + 10
                    while not kept_on_disk(cache, before) and time.monotonic() < waited:
                        time.sleep(0.01)
                    raise ConnectionError("the link went down")
                yield chunk

        monkeypatch.setattr(weight_shipping.WeightShipper, "_chunks", cut_after_four)
        with caplog.at_level(logging.INFO), pytest.raises(ClientError):
            mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stage_warnings(caplog):
            time.sleep(0.05)  # the stage sees the cut a moment after the orchestrator
        kept_then = kept_on_disk(cache, before)
        # the weights still resume: the next reload completes the transfer
        monkeypatch.setattr(weight_shipping.WeightShipper, "_chunks", whole)
        mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not [e for e in errors if "PutWeights" in e], errors
    (said,) = stage_warnings(caplog)
    assert "cut" in said, said
    kept = re.search(r"kept (\d+) bytes|kept nothing", said)
    assert kept, said
    assert int(kept.group(1) or 0) == kept_then, said  # the truth, as the disk has it


def test_a_stream_that_ends_short_of_its_offer_is_logged_as_cut(
    tiny_root, tmp_path, monkeypatch, caplog
):
    """grpcio may end a stream its caller cancelled as if the caller had finished it: the stage
    then sees fewer bytes than it asked for, and says so."""
    model_dir = make_tiny_model(tiny_root, "gqa")
    cache = tmp_path / "cache"
    monkeypatch.setattr(weight_shipping, "CHUNK_BYTES", 4096)
    stage = Stage(StageConfig(model="", fetch_weights=True, weights_cache=str(cache)))
    try:
        with caplog.at_level(logging.INFO):
            ship_range(stage, model_dir, tmp_path / "hashes", 0, 4, chunks_sent=3)
        (said,) = stage_warnings(caplog)
        assert "cut" in said and "ended short" in said, said
        kept = re.search(r"kept (\d+) bytes", said)
        assert kept and int(kept.group(1)) == kept_on_disk(cache, set()) == 3 * 4096, said
        with pytest.raises(FailedPrecondition, match="neither in this stage's model directory"):
            stage.load_layers(0, 4, 1)
        caplog.clear()
        ship_range(stage, model_dir, tmp_path / "hashes", 0, 4)  # resumes and completes
        assert not stage_warnings(caplog)
        stage.load_layers(0, 4, 1)
        assert stage.ready() == (True, "")
    finally:
        stage.close()


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """`directory` refuses new files while this is held: mode 0o555 for a user; root ignores
    modes, so for root the file system's immutable attribute (chattr +i). Skips where neither
    takes."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root ignores file modes, and chattr is not installed")
        made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
        undo = ["chattr", "-i", str(directory)]
        if made.returncode != 0:
            pytest.skip(f"chattr +i is refused here: {made.stderr.decode().strip()}")
    else:
        directory.chmod(0o555)
        undo = None
    try:
        probe = directory / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{directory} stays writable")
        yield
    finally:
        if undo is not None:
            subprocess.run(undo, check=True)
        else:
            directory.chmod(0o755)


def test_an_unwritable_cache_fails_a_reload_precisely_and_the_next_one_works(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")  # 4 layers
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    options = fetching(tmp_path, 2, strategy="custom", boundaries="0-1,2-3")
    partial = tmp_path / "cache-1" / "partial"
    with in_process_mesh(model_dir, 2, **options) as mesh:
        with unwritable(partial), pytest.raises(ClientError) as err:
            mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
        assert err.value.code == "FAILED_PRECONDITION", err.value
        assert "--weights-cache" in err.value.message and str(partial) in err.value.message
        assert "kept nothing" in err.value.message, err.value.message
        assert "keeps what arrived" not in err.value.message
        assert list(partial.iterdir()) == []  # the truth: nothing was kept
        assert mesh.orchestrator.router.plan.ranges[1].start == 2  # the old plan serves
        plan = mesh.client.reload_plan(strategy="custom", boundaries="0-0,1-3")
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
    assert int(plan["stages"][1]["fetch_bytes"]) > 0
    assert result.token_ids == expected


def test_a_start_refused_by_an_unwritable_cache_recovers_when_it_is_writable(tiny_root, tmp_path):
    model_dir = make_tiny_model(tiny_root, "gqa")
    expected = reference_greedy(model_dir, prompt(), NEW_TOKENS)
    partial = tmp_path / "cache-1" / "partial"
    with ExitStack() as stack:
        disk = stack.enter_context(ExitStack())
        disk.enter_context(unwritable(partial))
        mesh = stack.enter_context(in_process_mesh(model_dir, 2, **fetching(tmp_path, 2)))
        ok, detail = mesh.orchestrator.ready()
        assert not ok and "--weights-cache" in detail, detail
        disk.close()  # the disk is writable again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not mesh.orchestrator.ready()[0]:
            time.sleep(0.1)  # no admin reload: the orchestrator offers the weights again
        assert mesh.orchestrator.ready() == (True, "")
        assert [s.ready() for s in mesh.stages] == [(True, "")] * 2
        result = mesh.client.generate(token_ids=prompt(), max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected
