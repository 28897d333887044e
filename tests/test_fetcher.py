"""Unit tests of block planning and of cutting a byte stream into blocks."""

import trio

from rangefs.fetcher import BlockRun, _BlockAssembler, plan_runs


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


def test_assembler_cuts_any_chunking_into_whole_blocks() -> None:
    data = (bytes(range(256)) * 10)[:2500]  # blocks 4..8 of 512 bytes, the last one 452
    got: list[tuple[int, bytes]] = []

    async def on_block(first: int, payload: bytes | memoryview) -> None:
        for index in range(0, len(payload), 512):
            got.append((first + index // 512, bytes(payload[index : index + 512])))

    async def feed(sizes: list[int]) -> None:
        assembler = _BlockAssembler(512, 4, len(data), on_block)
        offset, i = 0, 0
        while offset < len(data):
            size = sizes[i % len(sizes)]
            await assembler.feed(offset, data[offset : offset + size])
            offset += size
            i += 1

    for sizes in ([1], [7, 900], [512], [2500], [511, 2]):
        got.clear()
        trio.run(feed, sizes)
        assert [block for block, _ in got] == [4, 5, 6, 7, 8]
        assert b"".join(payload for _, payload in got) == data
        assert [len(payload) for _, payload in got] == [512, 512, 512, 512, 452]


def test_readahead_grows_while_sequential_and_drops_on_a_jump() -> None:
    from rangefs.fetcher import Readahead

    ra = Readahead(initial=100, maximum=400, tolerance=50)
    assert ra.advise(0, 10) == 0  # one read says nothing yet
    assert ra.advise(10, 10) == 20 + 100
    assert ra.advise(20, 10) == 30 + 200
    assert ra.advise(30, 10) == 40 + 400
    assert ra.advise(40, 10) == 50 + 400  # capped
    assert ra.advise(45, 10) == 55 + 400  # a little disorder is still sequential
    assert ra.advise(400, 10) == 410 + 400  # a skip into the window being fetched too
    assert ra.advise(5000, 10) == 0  # a jump: random access, nothing ahead
    assert ra.window == 0
