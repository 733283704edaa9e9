import threading

import pytest

from heimdex_assets.pipelining import prefetch_map


@pytest.mark.parametrize(("n", "window"), [(0, 3), (1, 3), (50, 1), (50, 4), (7, 100)])
def test_results_come_in_order_with_at_most_window_items_ahead(n, window):
    started = 0
    lock = threading.Lock()

    def work(i):
        nonlocal started
        with lock:
            started += 1
        return i * i

    consumed = 0
    for value in prefetch_map(work, range(n), workers=3, window=window):
        assert value == consumed * consumed
        consumed += 1
        assert started - consumed <= window
    assert consumed == n


def test_an_exception_reaches_the_consumer_in_order():
    def work(i):
        if i == 3:
            raise ValueError("item 3 is broken")
        return i

    got = []
    with pytest.raises(ValueError, match="item 3 is broken"):
        for value in prefetch_map(work, range(10), window=2):
            got.append(value)
    assert got == [0, 1, 2]
