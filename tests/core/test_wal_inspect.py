"""``logstack wal inspect DIR`` (SPEC §10): segments, record counts, checkpoint, damage."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from logstack._entry import LogEntry
from logstack._metrics import Metrics
from logstack._wal import WalStore, recover_key_log, segment_name
from logstack._wal_format import EntryBatch, IdempotencyRecord, frame_bytes

RECEIVED_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def batch(i: int, n: int = 2, pad: int = 0) -> EntryBatch:
    entry = LogEntry(RECEIVED_NS, "INFO", "m" + "x" * pad, "svc", "test")
    return EntryBatch(f"req-{i}", RECEIVED_NS, [entry] * n)


def inspect(directory: Path, *, records: bool = False) -> tuple[int, str]:
    from logstack._wal_inspect import inspect_wal

    out = io.StringIO()
    status = inspect_wal(str(directory), show_records=records, out=out)
    return status, out.getvalue()


async def build_wal(root: Path) -> None:
    store = WalStore(root, 4096, Metrics())
    store.open()
    alpha = store.log_for("alpha")
    ends = [alpha.append([batch(i, pad=600)]) for i in range(9)]
    await alpha.sync()
    await alpha.commit_delivered(ends[1])
    beta = store.log_for("beta")
    beta.append([batch(100, n=1), IdempotencyRecord("feed" * 16, "req-100", 1, RECEIVED_NS)])
    await beta.sync()
    store.close()


@pytest.fixture
def wal_root(tmp_path: Path) -> Path:
    """alpha: 3 small segments, first 2 batches delivered; beta: one batch + idempotency."""
    root = tmp_path / "wal"
    trio.run(build_wal, root)
    assert [p.name for p in sorted((root / "alpha").glob("*.seg"))] == [
        segment_name(1),
        segment_name(2),
        segment_name(3),
    ]
    return root


def key_section(report: str, key: str) -> str:
    """The lines of ``report`` about one key."""
    start = report.index(f"key {key}: ")
    end = report.find("\nkey ", start)
    return report[start : None if end < 0 else end + 1]


def segment_line(report: str, seq: int, key: str = "alpha") -> str:
    section = key_section(report, key).splitlines()
    (line,) = [ln for ln in section if ln.strip().startswith(segment_name(seq))]
    return line


def test_reports_segments_counts_and_checkpoint(wal_root: Path) -> None:
    status, report = inspect(wal_root)
    assert status == 0, report
    assert "key alpha: 3 segment(s)" in report
    assert "key beta: 1 segment(s)" in report
    assert report.index("key alpha") < report.index("key beta")

    sizes = {seq: (wal_root / "alpha" / segment_name(seq)).stat().st_size for seq in (1, 2, 3)}
    counts = {}
    for seq in (1, 2, 3):
        line = segment_line(report, seq)
        assert f"{sizes[seq]} bytes" in line
        match = re.search(
            r"(\d+) entry_batches, (\d+) entries, (\d+) checkpoints, (\d+) idem", line
        )
        assert match, line
        counts[seq] = tuple(int(g) for g in match.groups())
    assert sum(c[0] for c in counts.values()) == 9
    assert sum(c[1] for c in counts.values()) == 18
    # Segments 2 and 3 each start with the rotation checkpoint; the commit adds one more.
    assert sum(c[2] for c in counts.values()) == 3
    assert "DAMAGE" not in report and "quarantine" not in report

    alpha_part = key_section(report, "alpha")
    delivered = recover_key_log("alpha", wal_root / "alpha", 4096, Metrics())
    delivered.close()
    assert delivered.delivered[0] == 1
    assert f"delivered up to segment 1 offset {delivered.delivered[1]}\n" in alpha_part
    beta_part = key_section(report, "beta")
    assert "1 entry_batches, 1 entries, 0 checkpoints, 1 idempotency" in beta_part
    assert "no delivery checkpoint" in beta_part


def test_show_records_lists_every_record_under_its_segment(wal_root: Path) -> None:
    status, report = inspect(wal_root, records=True)
    assert status == 0
    lines = report.splitlines()
    entries = [ln for ln in lines if re.match(r"    @\d+: entries x2 request=req-\d+ at ", ln)]
    assert len(entries) == 9
    assert all(ln.endswith("2023-11-14T22:13:20.000000Z") for ln in entries)
    assert "@24: entries x2 request=req-0 " in report
    assert sum("checkpoint delivered<(" in ln for ln in lines) == 3
    assert f"idempotency {'feed' * 16} -> req-100" in report

    # Each record line sits below its own segment's line.
    current = None
    owner: dict[str, str] = {}
    for line in lines:
        if re.match(r"  \d{16}\.seg: ", line):
            current = line.split(":")[0].strip()
        elif line.startswith("    @"):
            assert current is not None, line
            owner[line.split(":")[1].strip()] = current
    assert owner["entries x2 request=req-0 at 2023-11-14T22"] == segment_name(1)
    assert owner["entries x2 request=req-8 at 2023-11-14T22"] == segment_name(3)


def test_key_directory_alone(wal_root: Path) -> None:
    status, report = inspect(wal_root / "beta")
    assert status == 0
    assert report.splitlines()[0] == "key beta: 1 segment(s)"
    assert "alpha" not in report


def test_torn_tail_is_damage(wal_root: Path) -> None:
    last = wal_root / "alpha" / segment_name(3)
    intact = last.stat().st_size
    with open(last, "ab") as handle:
        handle.write(frame_bytes(batch(99))[:30])
    before = last.read_bytes()

    status, report = inspect(wal_root)
    assert status == 1
    assert f"DAMAGE: torn tail at offset {intact} (30 bytes unreadable" in report
    assert last.read_bytes() == before  # read-only: inspect never repairs
    damage_line = report.index("DAMAGE")
    assert report.rindex(segment_name(3), 0, damage_line) > report.index(segment_name(2))


def test_corrupt_frame_is_damage(wal_root: Path) -> None:
    first = wal_root / "alpha" / segment_name(1)
    data = bytearray(first.read_bytes())
    data[40] ^= 0x01  # inside the first record's payload
    first.write_bytes(bytes(data))
    status, report = inspect(wal_root)
    assert status == 1
    assert "DAMAGE: corrupt frame at offset 24 " in report
    assert "the records after it are intact" in report
    # The damaged first record is skipped; the ones after it are still read and counted.
    assert "2 entry_batches" in segment_line(report, 1)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"NOT A SEGMENT", "13 bytes, BAD HEADER"),
        # The newest segment's header never reached the disk (a crash as it was created).
        (b"", "0 bytes, TORN: its header never reached the disk"),
    ],
    ids=["bad-header", "torn-at-creation"],
)
def test_bad_header_and_quarantine(wal_root: Path, content: bytes, said: str) -> None:
    (wal_root / "beta" / segment_name(2)).write_bytes(content)
    status, report = inspect(wal_root / "beta")
    assert status == 1
    assert f"{segment_name(2)}: {said}" in report
    assert ("BAD HEADER" in report) == ("BAD HEADER" in said)

    # After the server's recovery the segment sits in quarantine and the WAL is clean.
    recover_key_log("beta", wal_root / "beta", 4096, Metrics()).close()
    status, report = inspect(wal_root / "beta")
    assert status == 0, report
    assert "key beta: 1 segment(s)" in report
    assert "quarantine: 1 file(s)" in report


def test_odd_names_are_reported_as_the_server_reads_them(wal_root: Path) -> None:
    """A directory with a segment's name was a traceback (IsADirectoryError); a junk
    ``*.seg`` the server never reads was called damage."""
    (wal_root / "beta" / segment_name(7)).mkdir()
    (wal_root / "beta" / "notes.seg").write_bytes(b"junk")
    status, report = inspect(wal_root / "beta")
    assert status == 1
    assert f"{segment_name(7)}: BAD HEADER: not a file" in report
    assert "notes.seg: not a segment's name; the server ignores it" in report
    assert "key beta: 2 segment(s)" in report  # one real segment and the directory


def test_an_empty_wal_says_so(tmp_path: Path) -> None:
    status, report = inspect(tmp_path)
    assert status == 0
    assert report == f"{tmp_path}: no key has written to this WAL yet\n"


def test_not_a_directory(tmp_path: Path) -> None:
    status, report = inspect(tmp_path / "missing")
    assert status == 2
    assert "not a directory" in report


def test_cli_subprocess_reports_damage(wal_root: Path) -> None:
    last = wal_root / "alpha" / segment_name(3)
    with open(last, "ab") as handle:
        handle.write(b"\x07\x00")
    proc = subprocess.run(
        [sys.executable, "-m", "logstack", "wal", "inspect", str(wal_root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "key alpha: 3 segment(s)" in proc.stdout
    assert "key beta: 1 segment(s)" in proc.stdout
    assert "DAMAGE: torn tail" in proc.stdout
    assert "delivered up to segment" in proc.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "logstack", "wal", "inspect", "--records", str(wal_root / "beta")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "@24: entries x1 request=req-100" in proc.stdout
