"""Long work for real: three real RunPod SDK workers making one M4B; kill -9 mid-book and resume;
memory flat in book length; the CLI's bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker.longform.writer import partial_path
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from tests.conftest import run_cli

WORKER_ENV = {"BROKER_LOCAL__DEVICE": "cpu"}


def three_chapters() -> str:
    parts = []
    for c in range(3):
        body = " ".join(f"In chapter {c + 1}, sentence {i} is spoken by a worker." for i in range(6))
        parts.append(f"Chapter {c + 1}\n\n{body}\n")
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.usefixtures("piper_available")
def test_three_chapters_through_three_real_runpod_workers_make_an_m4b(tmp_path: Path) -> None:
    import av

    from broker.providers.runpod import RunPodProvider
    from broker.testing.runpod_emulator import RunPodEmulator

    with RunPodEmulator(worker_env=WORKER_ENV, long_poll_s=5, workers_max=3) as emu:
        for _ in range(3):
            emu.wait_for_worker(timeout=240)
        deadline = time.monotonic() + 240
        while len(emu.cold_starts) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # all three workers polling, so pieces can spread
        settings = Settings()
        settings.ledger.path = str(tmp_path / "ledger.sqlite")
        settings.manager.fallback_local = False
        settings.runpod.workers_max = 3
        rp = RunPodProvider(emu.endpoint_id, emu.api_key, base_url=emu.base_url, queue_timeout_s=120.0)
        manager = CloudGPUManager([rp], settings=settings)
        out = tmp_path / "book.m4b"
        # small pieces (two sentences) so each chapter has several and all three workers get some
        result = manager.speak_long(three_chapters(), output=out, target_run_s=0.4)
        manager.close()
        workers = {j["workerId"] for j in emu.state()["jobs"].values() if j.get("workerId")}
    assert result.chapters == 3 and result.pieces >= 6
    assert result.pieces_run == result.pieces and result.providers == {rp.name: result.pieces}
    assert len(workers) == 3, workers  # the pieces really ran side by side on three SDK workers
    with av.open(str(out)) as container:
        chapters = container.chapters()
        duration = container.duration / 1e6
    assert [c["metadata"]["title"] for c in chapters] == ["Chapter 1", "Chapter 2", "Chapter 3"]
    assert duration == pytest.approx(result.audio_seconds, abs=0.2)
    ends = [float(c["end"] * c["time_base"]) for c in chapters]
    assert ends[-1] == pytest.approx(duration, abs=0.2) and ends == sorted(ends)


BOOK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings
    from broker.testing.fake import FakeProvider, fake_catalog

    ledger, out, words = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = Settings()
    s.ledger.path = ledger
    s.manager.fallback_local = False
    fake = FakeProvider("cloud", latency_s=float(sys.argv[4]), usd_per_second=0.01, max_concurrency=2,
                        keep_jobs=False)
    m = CloudGPUManager([fake], settings=s, catalog=fake_catalog(fake))
    sentences = [f"Line {i} of the book goes on for a while here." for i in range(words // 10)]
    text = "Chapter 1\\n\\n" + " ".join(sentences[: len(sentences) // 2]) + "\\n\\nChapter 2\\n\\n" + \\
        " ".join(sentences[len(sentences) // 2:])
    r = m.speak_long(text, output=Path(out), target_run_s=float(sys.argv[5]))
    m.ledger.flush()
    import json, resource
    print(json.dumps({**r.summary(), "attempts": len(r.attempts), "submits": fake.submits,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run_book(tmp_path: Path, words: int, latency: float, target: float) -> subprocess.Popen[str]:
    script = tmp_path / "book.py"
    script.write_text(BOOK_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "ledger.sqlite"), str(tmp_path / "b.wav"),
                             str(words), str(latency), str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def done_pieces(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM longform_pieces WHERE state = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def test_kill_9_mid_book_then_rerun_pays_only_for_missing_pieces(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    proc = run_book(tmp_path, 600, 0.15, 0.3)
    deadline = time.monotonic() + 60
    while done_pieces(db) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]
    before = done_pieces(db)
    assert before >= 4
    assert not (tmp_path / "b.wav").exists()  # the killed run left nothing at -o
    rerun = run_book(tmp_path, 600, 0.0, 0.3)
    stdout, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["pieces_reused"] == before
    assert summary["pieces_run"] == summary["submits"] == summary["pieces"] - before
    con = sqlite3.connect(db)
    succeeded = con.execute("SELECT COUNT(*) FROM attempts WHERE status = 'succeeded'").fetchone()[0]
    con.close()
    # every piece was paid for once: the reused ones in the killed run, the rest in the rerun
    assert succeeded == summary["pieces"]
    assert (tmp_path / "b.wav").is_file()


@pytest.mark.slow
def test_memory_is_flat_in_book_length(tmp_path: Path) -> None:
    rss = {}
    for words in (1_000, 20_000):
        d = tmp_path / str(words)
        d.mkdir()
        proc = run_book(d, words, 0.0, 1.0)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["audio_seconds"] > words * 0.3
        rss[words] = summary["max_rss_mb"]
    assert rss[20_000] - rss[1_000] < 50, rss


# -- the CLI's bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "args", "message"), [
    (b"", ["-o", "x.wav"], "empty"),
    (b"\\x00\\x01binary\\x00", ["-o", "x.wav"], "binary"),
    (b"caf\\xe9 au lait.", ["-o", "x.wav"], "not UTF-8"),
    (b"Some words.", ["-o", "x.ogg"], "unknown extension"),
    (b"Some words.", ["--split-chapters", "book.txt"], "is a file"),
    (b"Some words.", [], "give -o"),
])
def test_cli_bad_book_input_exits_2(tmp_path: Path, content: bytes, args: list[str], message: str) -> None:
    f = tmp_path / "book.txt"
    f.write_bytes(content.decode("unicode_escape").encode("latin-1"))
    r = run_cli("speak", "--file", str(f), *[str(tmp_path / a) if a.endswith((".wav", ".ogg", ".txt")) else a
                                              for a in args], env={"BROKER_LEDGER__PATH": str(tmp_path / "l.db")})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.wav").exists() and not partial_path(tmp_path / "x.wav").exists()


def test_cli_epub_without_text_exits_2(tmp_path: Path) -> None:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("x")
    book.set_title("Empty")
    page = epub.EpubHtml(title="blank", file_name="blank.xhtml", content="<html><body><img src='a.png'/></body></html>")
    book.add_item(page)
    book.spine = [page]
    book.add_item(epub.EpubNav())
    epub.write_epub(str(tmp_path / "empty.epub"), book)
    r = run_cli("speak", "--file", str(tmp_path / "empty.epub"), "-o", str(tmp_path / "x.m4b"))
    assert r.returncode == 2 and "no text" in r.stderr, r.stderr


def test_epub_chapters_come_from_the_spine(tmp_path: Path) -> None:
    from ebooklib import epub

    from broker.longform.text import read_chapters

    book = epub.EpubBook()
    book.set_identifier("y")
    book.set_title("Two")
    pages = []
    for i in (1, 2):
        body = f"<h1>Chapter {i}</h1><p>Words of part {i}.</p><p>More</p>"
        page = epub.EpubHtml(title=f"c{i}", file_name=f"c{i}.xhtml", content=f"<html><body>{body}</body></html>")
        book.add_item(page)
        pages.append(page)
    book.spine = pages
    book.add_item(epub.EpubNav())
    epub.write_epub(str(tmp_path / "two.epub"), book)
    chapters = read_chapters(tmp_path / "two.epub")
    assert [(c.title, c.text) for c in chapters] == [("Chapter 1", "Words of part 1. More."),
                                                      ("Chapter 2", "Words of part 2. More.")]
