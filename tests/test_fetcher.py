"""Unit tests of block planning, block progress of a byte stream, the readahead detector, and
how the fetch helper groups its reports."""

import trio
import trio.testing

from rangefs import fetchproc
from rangefs.fetcher import BlockProgress, BlockRun, plan_runs


def test_adjacent_blocks_coalesce_into_one_run() -> None:
    assert plan_runs([3, 1, 2, 7, 8, 10], max_blocks=64) == [BlockRun(1, 4), BlockRun(7, 9), BlockRun(10, 11)]


def test_runs_are_capped() -> None:
    assert plan_runs(range(10), max_blocks=4) == [BlockRun(0, 4), BlockRun(4, 8), BlockRun(8, 10)]


def test_duplicates_and_empty_input() -> None:
    assert plan_runs([5, 5, 5], max_blocks=2) == [BlockRun(5, 6)]
    assert plan_runs([], max_blocks=2) == []


def test_byte_range_is_clipped_at_end_of_file() -> None:
    assert BlockRun(2, 5).byte_range(block_size=100, file_size=450) == (200, 450)
    assert BlockRun(0, 1).byte_range(block_size=100, file_size=1000) == (0, 100)


def test_progress_reports_each_block_once_whatever_the_chunking() -> None:
    run = BlockRun(4, 9)  # blocks 4..8 of 512 bytes; the file ends 452 bytes into block 8
    start, stop = run.byte_range(512, 8 * 512 + 452)
    for sizes in ([1], [7, 900], [512], [2500], [511, 2]):
        progress = BlockProgress(512, run, start, stop)
        reported: list[int] = []
        offset, i = start, 0
        while offset < stop:
            offset = min(stop, offset + sizes[i % len(sizes)])
            i += 1
            done = progress.advance(offset)
            if done is not None:
                assert done[0] == (reported[-1] + 1 if reported else 4)  # in order, no gap, no repeat
                reported.extend(range(*done))
            # a block is reported only once all its bytes are written
            assert all((block + 1) * 512 <= offset or block == 8 for block in reported)
        assert reported == [4, 5, 6, 7, 8]


def test_progress_of_a_partial_write_reports_nothing_early() -> None:
    progress = BlockProgress(100, BlockRun(0, 3), 0, 300)
    assert progress.advance(99) is None
    assert progress.advance(100) == (0, 1)
    assert progress.advance(150) is None
    assert progress.advance(300) == (1, 3)
    assert progress.advance(300) is None


def test_readahead_grows_with_what_was_read_and_drops_on_a_jump() -> None:
    from rangefs.prefetch import Readahead

    ra = Readahead(initial=100, maximum=400, tolerance=50)
    assert ra.advise(0, 10) == 0  # one read says nothing yet
    assert ra.advise(10, 10) == 20 + 100  # sequential: at least the initial window
    assert ra.advise(20, 300) == 320 + 160  # half of what was read so far (320 bytes)
    assert ra.advise(300, 10) == 320 + 160  # a little disorder is still sequential, adds nothing
    assert ra.advise(400, 10) == 410 + 205  # a skip into the window being fetched too
    assert ra.advise(410, 1000) == 1410 + 400  # capped
    assert ra.advise(5000, 10) == 0  # a jump: random access, nothing ahead
    assert ra.window == 0


def test_checksums_are_per_block_whatever_the_chunking() -> None:
    import xxhash

    from rangefs.fetcher import BlockChecksums, block_sum

    data = bytes(range(256)) * 9 + b"tail"  # blocks of 512: four whole, one of 260 bytes
    expected = [block_sum(data[i : i + 512]) for i in range(0, len(data), 512)]
    assert expected[0] == xxhash.xxh3_64_intdigest(data[:512]) & 0xFFFFFFFF
    for size in (1, 7, 512, 1000, len(data)):
        sums = BlockChecksums(512)
        got: list[int] = []
        for offset in range(0, len(data), size):
            sums.feed(offset, data[offset : offset + size])
            complete = min(offset + size, len(data)) // 512
            got += sums.take(complete - len(got))
        got += sums.take(1)  # the short last block
        assert got == expected, size


def test_helper_reports_go_together_up_to_a_size_and_none_waits_past_a_delay() -> None:
    sent: list[tuple[object, ...]] = []

    async def send(message: tuple[object, ...]) -> None:
        sent.append(message)

    async def run() -> None:
        block = 64 * 1024
        reports = fetchproc._Reports(send, 7, block)
        most = fetchproc._REPORT_BYTES // block
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reports.send_when_due)
            await reports.add(0, 3, [1, 2, 3])
            await trio.sleep(fetchproc._REPORT_DELAY / 2)
            await reports.add(3, 5, [4, 5])
            await trio.sleep(fetchproc._REPORT_DELAY * 0.4)
            assert sent == []  # held for the next blocks...
            await trio.sleep(fetchproc._REPORT_DELAY * 0.2)  # the first block's delay is up
            assert sent == [("written", 7, 0, 5, [1, 2, 3, 4, 5])]  # ...but not for long
            await reports.add(5, 5 + most, list(range(most)))
            assert sent[-1] == ("written", 7, 5, 5 + most, list(range(most)))  # a full report goes at once
            await reports.add(5 + most, 6 + most, [9])
            await reports.add(9 + most, 10 + most, [8])  # not adjacent: what came before goes alone
            await reports.send_now()
            assert sent[-2:] == [("written", 7, 5 + most, 6 + most, [9]), ("written", 7, 9 + most, 10 + most, [8])]
            reports.timer.cancel()
        assert len(sent) == 4

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no flakiness
