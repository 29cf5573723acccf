"""Issue 15: the fixed costs around a job — the collector at start-up, plugin lookups, idle heap, encoding."""

from __future__ import annotations

import ctypes
import struct
import sys
import threading

import numpy as np
import pytest

from tests.conftest import ROOT, python_child
from tests.media_support import speechlike


def _probe(code: str, *args: str) -> dict[str, object]:
    """Run the console script's ``main()`` with ``args`` in a fresh interpreter after ``code``; the JSON
    object that ``code``'s ``report()`` prints at the end."""
    script = (code + "\nsys.argv = ['broker', *" + repr(list(args)) + "]\nfrom broker.cli import main\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint(json.dumps(report()))\n")
    result, _ = python_child(script, {"BROKER_CONFIG": str(ROOT / "tests" / "data" / "empty.toml")})
    assert isinstance(result, dict)
    return result


def test_the_console_script_collects_nothing_until_the_command_runs() -> None:
    """Start-up's objects live to the end: no collection walks them; the command runs with the collector on."""
    code = """
import gc, json, sys
import broker.cli.common as common
collections = []
at_command = {}
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(gc.get_freeze_count()))
original = common.preflight
def preflight(name):
    at_command.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
    return original(name)
common.preflight = preflight
collections.clear()  # what importing the probe itself collected does not count
def report():
    return {"before_command": sum(1 for frozen in collections if frozen == 0), **at_command,
            "enabled_after": gc.isenabled()}
"""
    found = _probe(code, "providers", "--json", "--no-probe")
    assert found["before_command"] == 0, found  # none while broker's modules, pydantic and Typer load
    assert found["enabled"] is True and isinstance(found["frozen"], int) and found["frozen"] > 10_000, found
    assert found["enabled_after"] is True


def test_a_run_reads_each_installed_distributions_entry_points_once() -> None:
    """Provider kinds and engines are both plugin groups: one pass over the installed packages serves both."""
    code = """
import json, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith("entry_points.txt"):
        opened.append(args[0])
sys.addaudithook(hook)
def report():
    return {"opened": len(opened), "distinct": len(set(opened))}
"""
    found = _probe(code, "providers", "--json", "--no-probe")
    assert isinstance(found["opened"], int) and found["opened"] > 0  # broker's own dist at least
    assert found["opened"] == found["distinct"], found


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_goes_back_to_the_system() -> None:
    """What a model load frees inside the heap (not at its top) is returned, as the loader asks after loading."""
    from broker.engines.heap import release_free_heap

    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc: there is nothing to call")
    # ~48 MB of 1 KiB blocks (malloc's, not pymalloc's), every 64th kept so the freed ones sit between live ones
    blocks = [bytes(1024) for _ in range(48_000)]
    kept = blocks[::64]
    del blocks
    before = _rss_kb()
    release_free_heap()
    after = _rss_kb()
    assert before - after > 20_000, (before, after)  # KiB
    assert len(kept) == 750


# -- AAC beside the video -------------------------------------------------------------------------
def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the MP4 boxes in data[start:end]."""
    end = len(data) if end is None else end
    found = []
    while start + 8 <= end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[start + 8:start + 16])[0], 16
        size = size or end - start
        found.append((kind, start + header, start + size))
        start += size
    return found


def test_audio_encoded_beside_the_video_is_whole_and_every_fragment_carries_both() -> None:
    av = pytest.importorskip("av")
    import io

    from broker.engines import encode

    audio = speechlike(6.4)
    writer = encode.Mp4Writer(64, 64, 25, audio, try_nvenc=False)
    grey = np.full((32, 32), 128, np.uint8)
    for i in range(160):
        writer.write(np.full((64, 64), i % 256, np.uint8), grey, grey)
    data = writer.finish()
    fragments = [(s, e) for kind, s, e in _boxes(data) if kind == b"moof"]
    assert len(fragments) >= 3  # a keyframe (and a fragment) every 2 s
    for s, e in fragments:
        assert sum(kind == b"traf" for kind, _, _ in _boxes(data, s, e)) == 2  # video and audio, each time
    with av.open(io.BytesIO(data)) as container:
        decoded = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
    # the whole track (AAC pads to its 1024-sample frames), and sound, not silence
    assert len(audio.samples) <= len(decoded) < len(audio.samples) + 2 * 1024
    assert float(np.sqrt(np.mean(decoded ** 2))) > 0.07  # the input's is ~0.14
    assert not any(t.name == "broker-aac" for t in threading.enumerate())


def test_an_aborted_writer_stops_its_audio_encoder() -> None:
    pytest.importorskip("av")
    from broker.engines import encode

    writer = encode.Mp4Writer(64, 64, 25, speechlike(30.0), try_nvenc=False)
    grey = np.full((32, 32), 128, np.uint8)
    writer.write(np.zeros((64, 64), np.uint8), grey, grey)
    writer.abort()
    assert not any(t.name == "broker-aac" for t in threading.enumerate())

